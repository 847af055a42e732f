//! Every docker CLI call the agent makes, with typed results. This is the one place that
//! reads docker's messages: a missing container or image becomes [`DockerError::NotFound`],
//! so no caller matches on text. Values (registry password, env values) never reach argv.

use crate::sys::executor::{Cmd, ExecError, Limits, Runner};
use crate::sys::secret::Secret;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// Short docker calls (ps, inspect, rm, port) must never hang a task.
pub const SHORT: Duration = Duration::from_secs(60);
/// Pulling a large image over a slow link.
const PULL_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// `docker run -d` copies the image's layers on some storage drivers (vfs).
const RUN_TIMEOUT: Duration = Duration::from_secs(5 * 60);
const PROBE_TIMEOUT: Duration = Duration::from_secs(20);
/// Reading a long container log.
const LOGS_TIMEOUT: Duration = Duration::from_secs(5 * 60);

#[derive(Debug)]
pub enum DockerError {
    /// The container, image or object does not exist.
    NotFound(ExecError),
    /// The call failed otherwise (exit code, timeout, cancel...).
    Failed(ExecError),
    /// The call succeeded but printed something we cannot read.
    Unreadable { what: String, got: String },
}

impl DockerError {
    fn from_exec(e: ExecError) -> DockerError {
        const MISSING: &[&str] = &["No such container", "No such object", "No such image"];
        let missing = matches!(e, ExecError::Exit { .. })
            && e.output()
                .is_some_and(|o| o.tail.iter().any(|l| MISSING.iter().any(|m| l.contains(m))));
        if missing {
            DockerError::NotFound(e)
        } else {
            DockerError::Failed(e)
        }
    }
}

impl DockerError {
    /// What docker itself printed (its last lines), e.g. `Error response from daemon: No such
    /// container: muvee-app`; empty when it printed nothing.
    pub fn printed(&self) -> String {
        match self {
            DockerError::NotFound(e) | DockerError::Failed(e) => {
                e.output().map(|o| o.tail.join("\n")).unwrap_or_default()
            }
            DockerError::Unreadable { got, .. } => got.clone(),
        }
    }
}

impl fmt::Display for DockerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DockerError::NotFound(e) | DockerError::Failed(e) => e.fmt(f),
            DockerError::Unreadable { what, got } => write!(f, "cannot read {what}: {got:?}"),
        }
    }
}

impl std::error::Error for DockerError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            DockerError::NotFound(e) | DockerError::Failed(e) => Some(e),
            DockerError::Unreadable { .. } => None,
        }
    }
}

/// How this host builds images.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BuildMode {
    /// `docker buildx build --push`.
    Buildx,
    /// `DOCKER_BUILDKIT=1 docker build` then `docker push` (CLI < 23 has BuildKit built in).
    BuildKit,
    /// The legacy builder then `docker push`: no build secrets.
    Legacy,
}

impl BuildMode {
    pub fn describe(self) -> &'static str {
        match self {
            BuildMode::Buildx => "docker buildx build --push",
            BuildMode::BuildKit => "DOCKER_BUILDKIT=1 docker build + docker push",
            BuildMode::Legacy => {
                "the legacy builder (docker build + docker push; no build secrets)"
            }
        }
    }
}

/// A row of `docker ps`, with our labels (empty for containers of the Go agent).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PsRow {
    pub id: String,
    pub name: String,
    pub running: bool,
    pub domain_prefix: String,
    pub deployment_id: String,
    pub expose_port: String,
    /// The compose project the container belongs to (`muvee-<prefix>` for ours), or "".
    pub compose_project: String,
    /// `com.docker.compose.project.working_dir`: where compose ran for it, or "".
    pub compose_dir: String,
    /// `muvee.node`: the NODE_NAME of the agent that started it (empty before that label).
    pub node: String,
}

/// One row of `docker stats --no-stream --format '{{json .}}'`, as docker prints it
/// (`"CPUPerc":"1.37%"`, `"MemUsage":"50MiB / 4GiB"`); `cp::metrics` reads the numbers.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(default)]
pub struct StatsRow {
    #[serde(rename = "Name")]
    pub name: String,
    #[serde(rename = "CPUPerc")]
    pub cpu: String,
    #[serde(rename = "MemUsage")]
    pub mem: String,
    #[serde(rename = "NetIO")]
    pub net: String,
    #[serde(rename = "BlockIO")]
    pub block: String,
}

/// What `docker logs` printed, stdout and stderr in arrival order, cut at a byte cap.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Logs {
    pub text: String,
    pub truncated: bool,
}

/// State of a container, from `docker inspect`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct State {
    pub status: String,
    pub restarts: u64,
    pub exit_code: i64,
    pub oom_killed: bool,
}

/// What `docker run -d` starts. Env values go through the CLI's environment (`-e NAME`) or
/// stdin (`--env-file /dev/stdin`), never argv.
#[derive(Debug, Default)]
pub struct RunSpec<'a> {
    pub name: &'a str,
    pub image: &'a str,
    /// `-p` value, e.g. `0:8080`.
    pub publish: String,
    pub labels: Vec<String>,
    pub memory: &'a str,
    pub volumes: Vec<String>,
    pub env: &'a [(String, String)],
}

/// What `docker build` / `docker buildx build` builds.
#[derive(Debug)]
pub struct BuildSpec<'a> {
    pub mode: BuildMode,
    pub dockerfile: &'a std::path::Path,
    pub context: &'a std::path::Path,
    pub tag: &'a str,
    /// (id, file) pairs for `--secret`.
    pub secrets: &'a [(String, PathBuf)],
    /// Names passed as `--build-arg NAME` (docker copies the value from its environment).
    pub build_args: &'a [&'a str],
    /// The project's layer cache tag (BuildKit modes): the image it names is the cache
    /// source, and this build's image, with inline cache metadata, becomes it.
    pub cache: Option<&'a str>,
}

pub struct Docker<'a> {
    cli: &'a str,
    runner: &'a dyn Runner,
}

impl<'a> Docker<'a> {
    pub fn new(cli: &'a str, runner: &'a dyn Runner) -> Docker<'a> {
        Docker { cli, runner }
    }

    fn cmd<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> Cmd {
        Cmd::new(self.cli).args(args.iter().map(|a| a.as_ref().to_os_string()))
    }

    /// A short call whose stdout we need.
    fn out<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> Result<String, DockerError> {
        let cmd = self.cmd(args).timeout(SHORT, "docker call timeout");
        self.runner
            .output(&cmd)
            .map(|o| o.stdout)
            .map_err(DockerError::from_exec)
    }

    fn stream(&self, cmd: &Cmd, on_line: &mut dyn FnMut(&str)) -> Result<(), DockerError> {
        self.runner
            .run(cmd, &mut |_, l| on_line(l))
            .map(drop)
            .map_err(DockerError::from_exec)
    }

    /// `docker login ADDR -u USER --password-stdin`: the password never reaches argv.
    pub fn login(&self, addr: &str, user: &str, password: &Secret) -> Result<(), DockerError> {
        let cmd = self
            .cmd(&["login", addr, "-u", user, "--password-stdin"])
            .stdin(password.expose().as_bytes().to_vec())
            .timeout(SHORT, "docker login timeout");
        self.runner
            .output(&cmd)
            .map(drop)
            .map_err(DockerError::from_exec)
    }

    /// Probes what the CLI actually does rather than trusting its version number: a 23+ CLI
    /// without the buildx plugin answers `DOCKER_BUILDKIT=1 docker build` with "BuildKit is
    /// enabled but the buildx component is missing" (exit 1) and only has the legacy builder;
    /// a 20.10 CLI has BuildKit (and `--secret`) built in.
    pub fn detect_build_mode(&self) -> BuildMode {
        let probe = |cmd: Cmd| {
            self.runner
                .output(&cmd.timeout(PROBE_TIMEOUT, "docker probe timeout"))
        };
        if probe(self.cmd(&["buildx", "version"])).is_ok() {
            return BuildMode::Buildx;
        }
        match probe(self.cmd(&["build", "--help"]).env("DOCKER_BUILDKIT", "1")) {
            Ok(o) if o.stdout.contains("--secret") => BuildMode::BuildKit,
            _ => BuildMode::Legacy,
        }
    }

    pub fn image_present(&self, image: &str) -> Result<bool, DockerError> {
        match self.out(&["image", "inspect", "--format", "{{.Id}}", image]) {
            Ok(_) => Ok(true),
            Err(DockerError::NotFound(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    pub fn pull(&self, image: &str, on_line: &mut dyn FnMut(&str)) -> Result<(), DockerError> {
        let cmd = self
            .cmd(&["pull", image])
            .timeout(PULL_TIMEOUT, "image pull limit 30m");
        self.stream(&cmd, on_line)
    }

    /// Containers (running and stopped with `all`) whose name contains `name`.
    pub fn ps(&self, all: bool, name: &str) -> Result<Vec<PsRow>, DockerError> {
        self.ps_filter(all, &format!("name={name}"))
    }

    /// Containers matching one `docker ps --filter` (`label=k=v`, `name=^x$`).
    pub fn ps_filter(&self, all: bool, filter: &str) -> Result<Vec<PsRow>, DockerError> {
        let mut args = vec!["ps", "--filter", filter, "--format", PS_FORMAT];
        if all {
            args.insert(1, "-a");
        }
        let out = self.out(&args)?;
        Ok(out.lines().filter_map(parse_ps_row).collect())
    }

    /// All containers (any state) carrying `label=value`.
    pub fn ps_labelled(&self, label: &str, value: &str) -> Result<Vec<PsRow>, DockerError> {
        self.ps_filter(true, &format!("label={label}={value}"))
    }

    pub fn rename(&self, from: &str, to: &str) -> Result<(), DockerError> {
        self.out(&["rename", from, to]).map(drop)
    }

    pub fn stop(&self, name: &str) -> Result<(), DockerError> {
        self.out(&["stop", "-t", "10", name]).map(drop)
    }

    pub fn start(&self, name: &str) -> Result<(), DockerError> {
        self.out(&["start", name]).map(drop)
    }

    /// `docker rm -f`; a container that does not exist is success.
    pub fn remove(&self, name: &str) -> Result<(), DockerError> {
        match self.out(&["rm", "-f", name]) {
            Ok(_) | Err(DockerError::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    pub fn state(&self, name: &str) -> Result<State, DockerError> {
        let out = self.out(&["inspect", "--format", STATE_FORMAT, name])?;
        let f: Vec<&str> = out.split_whitespace().collect();
        parse_state(&f).ok_or(DockerError::Unreadable {
            what: "the container state".into(),
            got: out,
        })
    }

    /// The state and the host port of `container_port` (IPv4 preferred) in one call: what
    /// each health probe needs.
    pub fn health(
        &self,
        name: &str,
        container_port: u16,
    ) -> Result<(State, (u16, bool)), DockerError> {
        let format = format!("{STATE_FORMAT} {{{{json .NetworkSettings.Ports}}}}");
        let out = self.out(&["inspect", "--format", &format, name])?;
        let f: Vec<&str> = out.trim().splitn(5, ' ').collect();
        let state =
            parse_state(f.get(..4).unwrap_or_default()).ok_or_else(|| DockerError::Unreadable {
                what: "the container state".into(),
                got: out.clone(),
            })?;
        if state.status != "running" {
            // A stopped container publishes nothing: its state is the answer.
            return Ok((state, (0, true)));
        }
        let port = f.get(4).and_then(|j| published(j, container_port));
        let port = port.ok_or_else(|| DockerError::Unreadable {
            what: format!("the host port of {container_port}/tcp from `docker inspect`"),
            got: f.get(4).unwrap_or(&"").to_string(),
        })?;
        Ok((state, port))
    }

    /// Host ports published for `spec` (e.g. `8080/tcp`), or for every port.
    pub fn ports(&self, name: &str, spec: Option<&str>) -> Result<Vec<(u16, bool)>, DockerError> {
        let mut args = vec!["port", name];
        args.extend(spec);
        Ok(host_ports(&self.out(&args)?))
    }

    /// The last lines the container printed (best effort, for error messages).
    pub fn logs_tail(&self, name: &str, lines: usize) -> String {
        let n = lines.to_string();
        let cmd = self
            .cmd(&["logs", "--tail", &n, name])
            .timeout(SHORT, "docker call timeout");
        match self.runner.output(&cmd) {
            Ok(o) => o.tail.join("\n"),
            Err(e) => e.output().map(|o| o.tail.join("\n")).unwrap_or_default(),
        }
    }

    /// The `docker run -d` argv; env values are in the Cmd's environment or stdin.
    pub fn run_cmd(&self, s: &RunSpec) -> Cmd {
        let mut cmd = self.cmd(&["run", "-d", "--name", s.name, "--restart", "unless-stopped"]);
        cmd = cmd.arg("-p").arg(&s.publish);
        for label in &s.labels {
            cmd = cmd.arg("--label").arg(label);
        }
        if !s.memory.is_empty() {
            cmd = cmd.args(["--memory", s.memory, "--memory-swap", s.memory]);
        }
        for v in &s.volumes {
            cmd = cmd.arg("-v").arg(v);
        }
        // `-e NAME` makes the CLI copy NAME from its own environment.
        let mut env_file = String::new();
        for (k, v) in s.env {
            if cli_reads(k) {
                env_file.push_str(&format!("{k}={v}\n"));
            } else {
                cmd = cmd.arg("-e").arg(k).env(k, v);
            }
        }
        if !env_file.is_empty() {
            cmd = cmd.args(["--env-file", "/dev/stdin"]).stdin(env_file);
        }
        cmd.arg(s.image).timeout(RUN_TIMEOUT, "docker run limit 5m")
    }

    pub fn run(&self, cmd: &Cmd, on_line: &mut dyn FnMut(&str)) -> Result<(), DockerError> {
        self.stream(cmd, on_line)
    }

    /// The build command of `mode` (with `--push` for buildx).
    pub fn build_cmd(&self, s: &BuildSpec) -> Cmd {
        let mut c = match s.mode {
            BuildMode::Buildx => self.cmd(&["buildx", "build"]).label("docker buildx build"),
            // Set both ways: an inherited DOCKER_BUILDKIT must not flip the builder.
            BuildMode::BuildKit => self.cmd(&["build"]).env("DOCKER_BUILDKIT", "1"),
            BuildMode::Legacy => self.cmd(&["build"]).env("DOCKER_BUILDKIT", "0"),
        };
        c = c
            .args(["--platform", "linux/amd64", "-f"])
            .arg(s.dockerfile)
            .args(["-t", s.tag]);
        if let (Some(cache), false) = (s.cache, s.mode == BuildMode::Legacy) {
            c = c.args(["-t", cache]);
            c = match s.mode {
                BuildMode::Buildx => c
                    .arg("--cache-from")
                    .arg(format!("type=registry,ref={cache}"))
                    .args(["--cache-to", "type=inline"]),
                _ => c
                    .args(["--cache-from", cache])
                    .args(["--build-arg", "BUILDKIT_INLINE_CACHE=1"]),
            };
        }
        c = match s.mode {
            BuildMode::Buildx => c.arg("--push"),
            // Failed legacy builds otherwise leave their intermediate containers behind.
            BuildMode::Legacy => c.arg("--force-rm"),
            BuildMode::BuildKit => c,
        };
        for (id, path) in s.secrets {
            c = c
                .arg("--secret")
                .arg(format!("id={id},src={}", path.display()));
        }
        for k in s.build_args {
            c = c.args(["--build-arg", k]);
        }
        c.arg(s.context)
    }

    /// Runs a build step (build or push) under `limits`; returns the pushed digest if the
    /// output named one.
    pub fn build_step(
        &self,
        cmd: Cmd,
        limits: Limits,
        on_line: &mut dyn FnMut(&str),
    ) -> Result<Option<String>, DockerError> {
        let mut digest = None;
        self.stream(&cmd.limits(limits), &mut |line| {
            if digest.is_none() {
                digest = pushed_digest(line);
            }
            on_line(line)
        })?;
        Ok(digest)
    }

    pub fn push_cmd(&self, tag: &str) -> Cmd {
        self.cmd(&["push", tag])
    }

    /// The registry digest of a pushed tag (`sha256:…`), when the engine knows it.
    pub fn repo_digest(&self, tag: &str, limits: Limits) -> Option<String> {
        let cmd = self
            .cmd(&["inspect", "--format", "{{index .RepoDigests 0}}", tag])
            .limits(limits);
        let out = self.runner.output(&cmd).ok()?;
        let s = out.stdout.trim();
        s.rsplit_once('@').map(|(_, d)| d.to_string())
    }

    /// `docker logs [--tail=N] [--since=S] NAME`: stdout and stderr as they arrive, kept up to
    /// `cap` bytes (the rest is read and dropped, so the container's log cannot block us).
    pub fn logs(
        &self,
        name: &str,
        tail: Option<u64>,
        since: Option<&str>,
        cap: usize,
    ) -> Result<Logs, DockerError> {
        let mut cmd = self.cmd(&["logs"]);
        if let Some(n) = tail {
            cmd = cmd.arg(format!("--tail={n}"));
        }
        if let Some(s) = since {
            cmd = cmd.arg(format!("--since={s}"));
        }
        let cmd = cmd.arg(name).timeout(LOGS_TIMEOUT, "docker logs limit 5m");
        let mut logs = Logs::default();
        self.stream(&cmd, &mut |line| {
            if logs.truncated {
                return;
            }
            let room = cap - logs.text.len();
            if line.len() < room {
                logs.text.push_str(line);
                logs.text.push('\n');
            } else {
                let cut = (0..=room).rev().find(|i| line.is_char_boundary(*i));
                logs.text.push_str(&line[..cut.unwrap_or(0)]);
                logs.truncated = true;
            }
        })?;
        Ok(logs)
    }

    /// `docker restart NAME`; returns what it printed.
    pub fn restart(&self, name: &str) -> Result<String, DockerError> {
        self.out(&["restart", name])
    }

    /// `docker stop ID...`; returns what it printed (the ids).
    pub fn stop_all(&self, ids: &[String]) -> Result<String, DockerError> {
        let mut args = vec!["stop"];
        args.extend(ids.iter().map(String::as_str));
        let cmd = self.cmd(&args).timeout(RUN_TIMEOUT, "docker stop limit 5m");
        self.runner
            .output(&cmd)
            .map(|o| o.stdout)
            .map_err(DockerError::from_exec)
    }

    /// `docker start ID...`; returns what it printed (the ids).
    pub fn start_all(&self, ids: &[String]) -> Result<String, DockerError> {
        let mut args = vec!["start"];
        args.extend(ids.iter().map(String::as_str));
        self.out(&args)
    }

    /// `docker inspect --format '{{json .}}' NAME`: the whole container document.
    pub fn inspect(&self, name: &str) -> Result<serde_json::Value, DockerError> {
        let out = self.out(&[
            "inspect",
            "--type",
            "container",
            "--format",
            "{{json .}}",
            name,
        ])?;
        json_of("the container's `docker inspect` document", &out)
    }

    /// The container's environment as docker keeps it (`NAME=value` entries).
    pub fn container_env(&self, name: &str) -> Result<Vec<String>, DockerError> {
        let format = "{{json .Config.Env}}";
        let out = self.out(&["inspect", "--type", "container", "--format", format, name])?;
        let env: Option<Vec<String>> = json_of("the container's environment", &out)?;
        Ok(env.unwrap_or_default())
    }

    /// One sample of `docker stats` for the running containers `names`. A container that went
    /// away since it was listed makes docker print nothing for all of them: then every running
    /// container is sampled and the rest are left out.
    pub fn stats(&self, names: &[String]) -> Result<Vec<StatsRow>, DockerError> {
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let mut args = vec!["stats", "--no-stream", "--format", "{{json .}}"];
        args.extend(names.iter().map(String::as_str));
        let out = match self.out(&args) {
            Err(DockerError::NotFound(_)) => {
                self.out(&["stats", "--no-stream", "--format", "{{json .}}"])?
            }
            other => other?,
        };
        let rows = out
            .lines()
            .filter_map(|l| serde_json::from_str::<StatsRow>(l).ok());
        Ok(rows.filter(|r| names.contains(&r.name)).collect())
    }

    /// The image's `Config.User` (`""`, `1000`, `1000:1000`, `app`, `app:staff`).
    pub fn image_user(&self, image: &str) -> Result<String, DockerError> {
        let out = self.out(&["image", "inspect", "--format", "{{.Config.User}}", image])?;
        Ok(out.trim().to_string())
    }

    /// The numeric uid and gid the image's user has, asked from the image itself (its
    /// /etc/passwd and /etc/group): `docker run --rm --entrypoint "" IMAGE sh -c 'id -u; id -g'`.
    pub fn image_ids(&self, image: &str) -> Result<(u32, u32), DockerError> {
        let args = [
            "run",
            "--rm",
            "--network",
            "none",
            "--entrypoint",
            "",
            image,
            "sh",
            "-c",
            "id -u; id -g",
        ];
        let out = self.out(&args)?;
        let ids: Vec<u32> = out
            .split_whitespace()
            .filter_map(|n| n.parse().ok())
            .collect();
        match ids[..] {
            [uid, gid] => Ok((uid, gid)),
            _ => Err(DockerError::Unreadable {
                what: "the image user's uid and gid from `id -u; id -g`".into(),
                got: out,
            }),
        }
    }

    /// Containers labelled `muvee.managed=true` (started by muvee-agent), in any state.
    pub fn managed(&self) -> Result<Vec<PsRow>, DockerError> {
        self.ps_filter(true, "label=muvee.managed=true")
    }

    /// Host paths (symlinks resolved) that containers labelled `muvee.managed=true` mount.
    pub fn managed_mounts(&self) -> Result<Vec<PathBuf>, DockerError> {
        let ids = self.out(&["ps", "-aq", "--filter", "label=muvee.managed=true"])?;
        let ids: Vec<&str> = ids.split_whitespace().collect();
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut args = vec!["inspect", "--format", "{{json .Mounts}}"];
        args.extend(ids);
        let out = match self.out(&args) {
            Ok(o) => o,
            // A container removed between the two calls makes inspect exit 1 after printing
            // the others; with nothing printed we cannot tell what is in use.
            Err(DockerError::NotFound(e)) | Err(DockerError::Failed(e)) => match e.output() {
                Some(o) if !o.stdout.trim().is_empty() => o.stdout.clone(),
                _ => return Err(DockerError::from_exec(e)),
            },
            Err(e) => return Err(e),
        };
        let mut paths = Vec::new();
        for line in out.lines() {
            let Ok(serde_json::Value::Array(mounts)) = serde_json::from_str(line) else {
                continue;
            };
            for m in mounts {
                if let Some(src) = m.get("Source").and_then(|s| s.as_str()) {
                    paths.push(std::fs::canonicalize(src).unwrap_or_else(|_| PathBuf::from(src)));
                }
            }
        }
        Ok(paths)
    }
}

/// Which compose CLI this host has: `docker compose` (v2 plugin) is preferred, Debian's
/// `docker-compose` (v1, Python) is the fallback.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ComposeCli {
    Plugin,
    Standalone,
}

impl ComposeCli {
    pub fn describe(self) -> &'static str {
        match self {
            ComposeCli::Plugin => "docker compose (v2)",
            ComposeCli::Standalone => "docker-compose (v1)",
        }
    }
}

/// One compose project: what every compose call of it repeats (`-p`, `-f`s,
/// `--project-directory`, `--env-file`) and the DOCKER_CONFIG holding the owner's registry
/// logins.
#[derive(Clone, Debug)]
pub struct Project {
    pub cli: ComposeCli,
    pub name: String,
    pub files: Vec<PathBuf>,
    pub dir: PathBuf,
    /// The CLI's own settings and `${...}` values, read instead of `dir/.env`.
    pub env_file: PathBuf,
    pub docker_config: Option<PathBuf>,
}

impl Docker<'_> {
    /// `docker exec -ti CONTAINER CMD...` for a control channel session, which runs it under
    /// a PTY of its own (not through the executor: it is interactive). `marker` goes into the
    /// process's environment, so [`Docker::kill_marked`] finds it and what it started.
    pub fn exec_tty(&self, container: &str, cmd: &[String], marker: &str) -> std::process::Command {
        let mut c = std::process::Command::new(self.cli);
        c.args(["exec", "-ti", "-e", marker, container]).args(cmd);
        c
    }

    /// Kills, inside `container`, every process whose environment holds `marker` (NAME=value)
    /// and all it started: processes whose parent, group or session is one of those, found
    /// again and again (each found one is stopped first, so it forks no more) until none is
    /// new, then all killed at once — before a parent dies, so a child that dropped the
    /// marker and left its group (`setsid env -i ...`) is still found by its parent. What
    /// escapes: a process that dropped the marker and whose parent died before the close
    /// (a double-forked daemon, re-parented to the container's PID 1). Needs `sh`, `grep`
    /// and `kill` in the container. (`grep -F` and `kill --` are not used: busybox's `-F`
    /// stops at the NULs of `environ`, and its `kill` refuses `--`.)
    pub fn kill_marked(&self, container: &str, marker: &str) -> Result<(), DockerError> {
        const SCRIPT: &str = "exec 2>/dev/null; m=' '; for d in /proc/[0-9]*; do \
            grep -qs \"$0\" \"$d/environ\" && m=\"$m${d#/proc/} \"; done; \
            [ \"$m\" = ' ' ] && exit 0; \
            while :; do n=$m; for d in /proc/[0-9]*; do p=${d#/proc/}; \
            case \"$n\" in *\" $p \"*) continue;; esac; [ \"$p\" = $$ ] && continue; \
            read -r s < \"$d/stat\" || continue; set -- ${s##*)}; \
            case \"$n\" in *\" $2 \"*|*\" $3 \"*|*\" $4 \"*) n=\"$n$p \";; esac; done; \
            kill -STOP $n; [ \"$n\" = \"$m\" ] && break; m=$n; done; \
            kill -9 $m; true";
        let cmd = self
            .cmd(&["exec", container, "sh", "-c", SCRIPT, marker])
            .timeout(Duration::from_secs(20), "docker exec kill timeout");
        self.runner
            .output(&cmd)
            .map(drop)
            .map_err(DockerError::from_exec)
    }

    /// `docker cp - CONTAINER:PATH` (up: a tar on stdin) or `docker cp CONTAINER:PATH -`
    /// (down: a tar on stdout), for a control channel session.
    pub fn cp_tar(&self, container: &str, path: &str, up: bool) -> std::process::Command {
        let mut c = std::process::Command::new(self.cli);
        let target = format!("{container}:{path}");
        if up {
            c.args(["cp", "-", &target]);
        } else {
            c.args(["cp", &target, "-"]);
        }
        c
    }
}

/// The compose label every container, network and volume of a project carries.
const PROJECT_LABEL: &str = "com.docker.compose.project";
const COMPOSE_UP_TIMEOUT: Duration = Duration::from_secs(10 * 60);

impl Docker<'_> {
    /// Probes the compose CLIs once per deploy; None when neither answers.
    pub fn compose_cli(&self) -> Option<ComposeCli> {
        let ok = |c: Cmd| {
            self.runner
                .output(&c.timeout(PROBE_TIMEOUT, "docker probe timeout"))
                .is_ok()
        };
        if ok(self.cmd(&["compose", "version"])) {
            Some(ComposeCli::Plugin)
        } else if ok(Cmd::new("docker-compose").arg("version")) {
            Some(ComposeCli::Standalone)
        } else {
            None
        }
    }

    fn compose_cmd(&self, p: &Project, sub: &[&str]) -> Cmd {
        let mut c = match p.cli {
            ComposeCli::Plugin => self
                .cmd(&["compose"])
                .label(format!("docker compose {}", sub[0])),
            ComposeCli::Standalone => {
                Cmd::new("docker-compose").label(format!("docker-compose {}", sub[0]))
            }
        };
        c = c.args(["-p", &p.name]);
        for f in &p.files {
            c = c.arg("-f").arg(f);
        }
        // What the CLI opens relative to its working dir (v1: seccomp profiles) is the project's.
        c = c.arg("--project-directory").arg(&p.dir).current_dir(&p.dir);
        c = c.arg("--env-file").arg(&p.env_file).args(sub);
        if let Some(cfg) = &p.docker_config {
            c = c.env("DOCKER_CONFIG", cfg.to_string_lossy());
        }
        c
    }

    /// `compose config`: the merged, normalised project (its YAML, for validation).
    pub fn compose_config(&self, p: &Project) -> Result<String, DockerError> {
        let cmd = self
            .compose_cmd(p, &["config"])
            .timeout(SHORT, "docker call timeout");
        self.runner
            .output(&cmd)
            .map(|o| o.stdout)
            .map_err(DockerError::from_exec)
    }

    pub fn compose_pull(
        &self,
        p: &Project,
        on_line: &mut dyn FnMut(&str),
    ) -> Result<(), DockerError> {
        let cmd = self
            .compose_cmd(p, &["pull"])
            .timeout(PULL_TIMEOUT, "image pull limit 30m");
        self.stream(&cmd, on_line)
    }

    /// `compose up -d --no-recreate`: starts the containers [`Docker::compose_create`] made
    /// (and connects v1's secondary networks, which it does only at start), recreating none.
    pub fn compose_up(
        &self,
        p: &Project,
        on_line: &mut dyn FnMut(&str),
    ) -> Result<(), DockerError> {
        let cmd = self
            .compose_cmd(p, &["up", "-d", "--no-recreate", "--remove-orphans"])
            .timeout(COMPOSE_UP_TIMEOUT, "compose up limit 10m");
        self.stream(&cmd, on_line)
    }

    /// `compose up --no-start --remove-orphans`: the project's containers as the engine
    /// will run them, created but not started, for the compose policy to judge.
    pub fn compose_create(
        &self,
        p: &Project,
        on_line: &mut dyn FnMut(&str),
    ) -> Result<(), DockerError> {
        let cmd = self
            .compose_cmd(p, &["up", "--no-start", "--remove-orphans"])
            .timeout(COMPOSE_UP_TIMEOUT, "compose up limit 10m");
        self.stream(&cmd, on_line)
    }

    /// Every container of compose project `project`, in any state, as the policy reads it.
    pub fn project_containers(&self, project: &str) -> Result<Vec<Created>, DockerError> {
        let filter = format!("label={PROJECT_LABEL}={project}");
        let out = self.out(&["ps", "-aq", "--filter", &filter])?;
        let ids: Vec<&str> = out.split_whitespace().collect();
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut args = vec!["inspect", "--type", "container", "--format", CREATED_FORMAT];
        args.extend(ids);
        json_stream(
            "the project's containers from `docker inspect`",
            &self.out(&args)?,
        )
    }

    /// The named volumes `names`: driver, options and labels.
    pub fn volumes(&self, names: &[&str]) -> Result<Vec<VolumeInfo>, DockerError> {
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let mut args = vec!["volume", "inspect", "--format", "{{json .}}"];
        args.extend(names);
        json_stream("volumes from `docker volume inspect`", &self.out(&args)?)
    }

    /// The networks `names`: name and labels.
    pub fn networks(&self, names: &[&str]) -> Result<Vec<NetworkInfo>, DockerError> {
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let format = r#"{"Name":{{json .Name}},"Labels":{{json .Labels}}}"#;
        let mut args = vec!["network", "inspect", "--format", format];
        args.extend(names);
        json_stream("networks from `docker network inspect`", &self.out(&args)?)
    }

    /// The id of the running container of `service` in compose project `project`, found by
    /// compose's labels (no compose call: the project's `.env` is gone by then).
    pub fn project_container(&self, project: &str, service: &str) -> Result<String, DockerError> {
        let p = format!("label={PROJECT_LABEL}={project}");
        let s = format!("label=com.docker.compose.service={service}");
        let out = self.out(&["ps", "-q", "--filter", &p, "--filter", &s])?;
        let id = out.split_whitespace().next().unwrap_or("");
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(DockerError::Unreadable {
                what: format!("a running container of service {service} from `docker ps`"),
                got: out,
            });
        }
        Ok(id.to_string())
    }

    /// `compose down -v --remove-orphans`.
    pub fn compose_down(&self, p: &Project) -> Result<(), DockerError> {
        let cmd = self
            .compose_cmd(p, &["down", "-v", "--remove-orphans"])
            .timeout(COMPOSE_UP_TIMEOUT, "compose down limit 10m");
        self.runner
            .output(&cmd)
            .map(drop)
            .map_err(DockerError::from_exec)
    }

    /// Removes every container, network and volume labelled as part of compose project
    /// `name`: works without the project's files, with either compose CLI.
    pub fn remove_project(&self, name: &str) -> Result<(), DockerError> {
        let filter = format!("label={PROJECT_LABEL}={name}");
        let list = |args: &[&str]| -> Result<Vec<String>, DockerError> {
            let out = self.out(args)?;
            Ok(out.split_whitespace().map(String::from).collect())
        };
        let ids = list(&["ps", "-aq", "--filter", &filter])?;
        if !ids.is_empty() {
            let mut args = vec!["rm", "-f", "-v"];
            args.extend(ids.iter().map(String::as_str));
            self.out(&args)?;
        }
        let nets = list(&["network", "ls", "-q", "--filter", &filter])?;
        if !nets.is_empty() {
            let mut args = vec!["network", "rm"];
            args.extend(nets.iter().map(String::as_str));
            self.out(&args)?;
        }
        let vols = list(&["volume", "ls", "-q", "--filter", &filter])?;
        if !vols.is_empty() {
            let mut args = vec!["volume", "rm", "-f"];
            args.extend(vols.iter().map(String::as_str));
            self.out(&args)?;
        }
        Ok(())
    }
}

/// What [`Docker::project_containers`] reads of each container (one JSON object each).
const CREATED_FORMAT: &str = r#"{"Id":{{json .Id}},"Name":{{json .Name}},"Status":{{json .State.Status}},"Service":{{json (index .Config.Labels "com.docker.compose.service")}},"HostConfig":{{json .HostConfig}},"Mounts":{{json .Mounts}},"Networks":{{json .NetworkSettings.Networks}}}"#;

/// A container as the compose policy judges it: what it gets of the host.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct Created {
    pub id: String,
    pub name: String,
    pub status: String,
    /// Its compose service.
    pub service: String,
    pub host_config: HostConfig,
    pub mounts: Option<Vec<Mount>>,
    /// The networks it is connected to, by name.
    pub networks: Option<std::collections::BTreeMap<String, serde::de::IgnoredAny>>,
}

/// The parts of a container's `HostConfig` that reach beyond the container.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct HostConfig {
    pub privileged: bool,
    pub network_mode: String,
    pub pid_mode: String,
    pub ipc_mode: String,
    #[serde(rename = "UTSMode")]
    pub uts_mode: String,
    pub userns_mode: String,
    pub cap_add: Option<Vec<String>>,
    pub devices: Option<Vec<Device>>,
    pub device_cgroup_rules: Option<Vec<String>>,
    pub security_opt: Option<Vec<String>>,
    pub sysctls: Option<std::collections::BTreeMap<String, String>>,
    pub volumes_from: Option<Vec<String>>,
    pub cgroup_parent: String,
    pub oom_score_adj: i64,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct Device {
    pub path_on_host: String,
}

/// One of a container's mounts: `bind` (Source is a host path), `volume` (Name), `tmpfs`...
#[derive(Debug, Default, serde::Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct Mount {
    #[serde(rename = "Type")]
    pub kind: String,
    pub source: String,
    pub destination: String,
    #[serde(rename = "RW")]
    pub rw: bool,
    pub name: Option<String>,
}

/// A named volume: its driver's options can make it a host path.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct VolumeInfo {
    pub name: String,
    pub driver: String,
    pub options: Option<std::collections::BTreeMap<String, String>>,
    pub labels: Option<std::collections::BTreeMap<String, String>>,
}

/// A network: who made it.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct NetworkInfo {
    pub name: String,
    pub labels: Option<std::collections::BTreeMap<String, String>>,
}

/// JSON documents printed one after another (cut lines rejoined as in [`json_of`]).
fn json_stream<T: serde::de::DeserializeOwned>(
    what: &str,
    out: &str,
) -> Result<Vec<T>, DockerError> {
    let joined: String = out.chars().filter(|c| *c != '\n').collect();
    serde_json::Deserializer::from_str(&joined)
        .into_iter()
        .collect::<Result<Vec<T>, _>>()
        .map_err(|_| DockerError::Unreadable {
            what: what.into(),
            got: out.chars().take(200).collect(),
        })
}

const STATE_FORMAT: &str =
    "{{.State.Status}} {{.RestartCount}} {{.State.ExitCode}} {{.State.OOMKilled}}";

/// The fields of [`STATE_FORMAT`].
fn parse_state(f: &[&str]) -> Option<State> {
    let [status, restarts, code, oom] = f else {
        return None;
    };
    Some(State {
        status: status.to_string(),
        restarts: restarts.parse().ok()?,
        exit_code: code.parse().ok()?,
        oom_killed: *oom == "true",
    })
}

/// The host port `{{json .NetworkSettings.Ports}}` publishes `container_port`/tcp on:
/// (port, bound on IPv4), IPv4 preferred.
fn published(json: &str, container_port: u16) -> Option<(u16, bool)> {
    let ports: serde_json::Value = serde_json::from_str(json).ok()?;
    let bindings = ports.get(format!("{container_port}/tcp"))?.as_array()?;
    let found: Vec<(u16, bool)> = bindings
        .iter()
        .filter_map(|b| {
            let port = b["HostPort"].as_str()?.parse().ok().filter(|p| *p != 0)?;
            Some((port, !b["HostIp"].as_str().unwrap_or("").contains(':')))
        })
        .collect();
    found.iter().find(|p| p.1).or(found.first()).copied()
}

/// The `docker ps` columns [`parse_ps_row`] reads.
const PS_FORMAT: &str = "{{.ID}}\t{{.Names}}\t{{.State}}\t{{.Label \"muvee.domain_prefix\"}}\t{{.Label \"muvee.deployment_id\"}}\t{{.Label \"muvee.expose_port\"}}\t{{.Label \"muvee.node\"}}\t{{.Label \"com.docker.compose.project\"}}\t{{.Label \"com.docker.compose.project.working_dir\"}}";

fn parse_ps_row(line: &str) -> Option<PsRow> {
    let f: Vec<&str> = line.split('\t').collect();
    let (&[id, name, state, prefix, dep, port], node, project, dir) =
        (f.get(..6)?, f.get(6), f.get(7), f.get(8))
    else {
        return None;
    };
    Some(PsRow {
        id: id.into(),
        name: name.into(),
        running: state == "running",
        domain_prefix: prefix.into(),
        deployment_id: dep.into(),
        expose_port: port.into(),
        compose_project: project.map_or(String::new(), |p| p.to_string()),
        node: node.map_or(String::new(), |n| n.to_string()),
        compose_dir: dir.map_or(String::new(), |d| d.to_string()),
    })
}

/// Docker prints `{{json .}}` on one line, but the executor cuts lines longer than 16 KiB:
/// JSON holds no raw newline (Go escapes them in strings), so dropping every `\n` rejoins it.
fn json_of<T: serde::de::DeserializeOwned>(what: &str, out: &str) -> Result<T, DockerError> {
    let joined: String = out.chars().filter(|c| *c != '\n').collect();
    serde_json::from_str(&joined).map_err(|_| DockerError::Unreadable {
        what: what.into(),
        got: out.chars().take(200).collect(),
    })
}

/// `docker port` output in any of its formats → (port, bound on IPv4), in output order.
pub fn host_ports(out: &str) -> Vec<(u16, bool)> {
    let mut ports = Vec::new();
    for line in out.lines() {
        // `8080/tcp -> 0.0.0.0:32768` (no port argument) or `0.0.0.0:32768`.
        let addr = line.rsplit("-> ").next().unwrap_or(line).trim();
        let Some((host, port)) = addr.rsplit_once(':') else {
            continue;
        };
        match port.parse::<u16>() {
            Ok(p) if p != 0 => ports.push((p, !host.contains(':'))),
            _ => {}
        }
    }
    ports
}

/// Names the docker CLI (a Go program, often root) or the dynamic loader read themselves.
/// Setting these in the CLI's environment would change what our `docker run` does (another
/// daemon, LD_PRELOAD...), so they go through `--env-file /dev/stdin` instead of `-e NAME`.
pub fn cli_reads(k: &str) -> bool {
    const PREFIXES: &[&str] = &["DOCKER_", "LD_", "SSH_", "XDG_", "MALLOC_", "BUILDX_"];
    const NAMES: &[&str] = &[
        "HOME",
        "PATH",
        "TMPDIR",
        "GCONV_PATH",
        "HOSTALIASES",
        "LOCALDOMAIN",
        "RES_OPTIONS",
        "GODEBUG",
        "GOGC",
        "GOMAXPROCS",
        "GOMEMLIMIT",
        "GOTRACEBACK",
        "NOTARY_AUTH",
    ];
    PREFIXES.iter().any(|p| k.starts_with(p))
        || NAMES.contains(&k)
        || k.to_ascii_uppercase().contains("PROXY")
}

/// `sha256:<64 hex>` from a push line: `docker push` prints `<tag>: digest: sha256:… size: N`,
/// buildx `pushing manifest for <tag>@sha256:…`.
pub fn pushed_digest(line: &str) -> Option<String> {
    if !line.contains("digest: ") && !line.contains("pushing manifest for") {
        return None;
    }
    let i = line.find("sha256:")?;
    let hex = line.get(i + 7..i + 7 + 64)?;
    hex.bytes()
        .all(|b| b.is_ascii_hexdigit())
        .then(|| format!("sha256:{hex}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn first_v4(out: &str) -> Option<(u16, bool)> {
        let p = host_ports(out);
        p.iter().find(|p| p.1).or(p.first()).copied()
    }

    #[test]
    fn host_port_in_every_docker_format() {
        assert_eq!(first_v4("0.0.0.0:32768\n"), Some((32768, true)));
        assert_eq!(first_v4("[::]:32769\n0.0.0.0:32768\n"), Some((32768, true)));
        assert_eq!(first_v4(":::32770\n"), Some((32770, false)));
        assert_eq!(first_v4("[::]:32771"), Some((32771, false)));
        assert_eq!(
            first_v4("8080/tcp -> 0.0.0.0:9000\n8080/tcp -> [::]:9000\n"),
            Some((9000, true))
        );
        assert_eq!(first_v4("127.0.0.1:5000\r\n"), Some((5000, true)));
        assert_eq!(first_v4(""), None);
        assert_eq!(first_v4("Error: No public port '8080/tcp'"), None);
    }

    #[test]
    fn published_ports_from_inspect_prefer_ipv4() {
        let j = r#"{"8080/tcp":[{"HostIp":"::","HostPort":"33001"},{"HostIp":"0.0.0.0","HostPort":"33000"}],"9/udp":null}"#;
        assert_eq!(published(j, 8080), Some((33000, true)));
        assert_eq!(
            published(r#"{"8080/tcp":[{"HostIp":"::","HostPort":"7"}]}"#, 8080),
            Some((7, false))
        );
        assert_eq!(published(j, 9), None);
        assert_eq!(published("{}", 8080), None);
        assert_eq!(published("null", 8080), None);
        let st = parse_state(&["running", "0", "0", "false"]).unwrap();
        assert_eq!((st.status.as_str(), st.restarts), ("running", 0));
        assert!(parse_state(&["running", "x", "0", "false"]).is_none());
    }

    #[test]
    fn digests_and_cli_names() {
        let d = "a".repeat(64);
        assert_eq!(
            pushed_digest(&format!("abc: digest: sha256:{d} size: 527")),
            Some(format!("sha256:{d}"))
        );
        assert_eq!(
            pushed_digest(&format!(
                "#9 pushing manifest for r/p:1@sha256:{d} 0.1s done"
            )),
            Some(format!("sha256:{d}"))
        );
        assert_eq!(pushed_digest(&format!("#5 sha256:{d}")), None);
        assert!(cli_reads("DOCKER_HOST") && cli_reads("LD_PRELOAD") && cli_reads("https_proxy"));
        assert!(!cli_reads("DATABASE_URL"));
    }
}
