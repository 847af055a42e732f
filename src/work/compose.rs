//! Deploy role, compose and image projects (`mode:"compose"`): a compose project named
//! `muvee-<domain_prefix>` from a cloned repository or the control plane's inline YAML, with
//! our override (published port, labels, workspace volume, memory limit) on top.
//!
//! Unlike the Go agent: the clone goes through the builder's safe clone (credentials in the
//! environment, never argv or the URL, also for hosted `http://` repos); the files are
//! validated in a staging dir before the running project's are replaced; `.env` values are
//! quoted so newlines, quotes and `#` arrive intact, and `.env` and the registry logins are
//! removed once `up` is done; `.env` is only the services' env file, never the compose CLI's
//! settings; cleanup works from labels, without the project's files.

use crate::config::ComposePolicy;
use crate::sys::docker::{ComposeCli, Created, Docker, Project};
use crate::sys::executor::{Deadline, Limits};
use crate::task::{Invalid, Payload};
use crate::work::builder;
use crate::work::ctx::Ctx;
use crate::work::error::TaskError;
use crate::work::spec::{self, Auth, ComposeSpec, DeploySpec, Source};
use crate::work::yaml::{self, Yaml};
use crate::work::{deployer, policy, reads, workspace};
use std::fs::DirBuilder;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Our additions to the project, next to (not inside) the repository.
const OVERRIDE: &str = "muvee.override.yml";
/// The compose CLI's own env file (`--env-file`), always empty: the CLI takes settings from
/// the project's env file (DOCKER_HOST, COMPOSE_*, and with some v2 releases any name, set
/// in its own environment), so the app's values in `.env` must never be that file.
const CLI_ENV: &str = "cli.env";
/// A clone of a compose repository has this long (it is small: compose files).
const CLONE_TIMEOUT: Duration = Duration::from_secs(10 * 60);

/// `deploy` with `mode:"compose"`: brings the project up; returns the exposed host port.
pub fn deploy(ctx: &Ctx) -> Result<u16, TaskError> {
    let p = Payload::of(&ctx.task.payload)?;
    let spec = DeploySpec::parse(ctx, &p)?;
    let Some(c) = &spec.compose else {
        return Err(TaskError::Invalid(
            "payload field `mode`: a compose deploy needs \"compose\"".into(),
        ));
    };
    let key = deployer::lock_key(spec.prefix);
    ctx.exclusive(&key, || up(ctx, &spec, c))
}

/// DATA_DIR/compose/<prefix>: the project's files, private (0700) because `.env` and the
/// registry logins pass through it.
fn work_dir(ctx: &Ctx, prefix: &str) -> PathBuf {
    ctx.cfg.data_dir.join("compose").join(prefix)
}

fn private_dir(dir: &Path) -> Result<(), TaskError> {
    let err = TaskError::io(format!("cannot create {}", dir.display()));
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(err)
}

fn remove_dir(dir: &Path) -> Result<(), TaskError> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(TaskError::Io {
            what: format!("cannot remove {}", dir.display()),
            err: e,
        }),
        _ => Ok(()),
    }
}

/// Removes a file or dir when dropped: `.env` and the private DOCKER_CONFIG go however the
/// deploy ends.
struct Remove(PathBuf);

impl Drop for Remove {
    fn drop(&mut self) {
        let r = if self.0.is_dir() {
            std::fs::remove_dir_all(&self.0)
        } else {
            std::fs::remove_file(&self.0)
        };
        if let Err(e) = r {
            if e.kind() != std::io::ErrorKind::NotFound {
                log::warn!("cannot remove {}: {e}", self.0.display());
            }
        }
    }
}

fn up(ctx: &Ctx, s: &DeploySpec, c: &ComposeSpec) -> Result<u16, TaskError> {
    let docker = ctx.docker();
    let cli = docker.compose_cli().ok_or_else(|| {
        TaskError::Unsupported(
            "compose deployments need `docker compose` (v2) or `docker-compose` (v1) on this node"
                .into(),
        )
    })?;
    let work = work_dir(ctx, s.prefix);
    private_dir(&work)?;
    write_file(&work, CLI_ENV, "")?;
    let (src, image, names) = stage(ctx, s, c, cli, &work)?;
    let mut project = project(cli, s.prefix, &src, &c.file, &work);
    let _env = Remove(write_env(&src, &s.env, cli)?);
    let _cfg = if c.auths.is_empty() {
        None
    } else {
        let dir = docker_config(&work, &c.auths)?;
        project.docker_config = Some(dir.clone());
        Some(Remove(dir))
    };
    ctx.say(&format!(
        "Deploying compose project {} with {}",
        project.name,
        cli.describe()
    ));
    let out = &mut |l: &str| (ctx.out)(l);
    // Pulled without our override: its workspace needs the pulled image's user (§4.5).
    let files = std::mem::take(&mut project.files);
    project.files = files[..1].to_vec();
    docker.compose_pull(&project, out)?;
    project.files = files;
    let ws = match &s.workspace {
        Some((dir, path)) => Some((workspace::prepare(ctx, dir, &image)?, *path)),
        None => None,
    };
    let mount = ws
        .as_ref()
        .map(|(d, path)| format!("{}:{path}:rw", d.display()));
    write_override(ctx, s, c, &names, &work, mount.as_deref())?;
    let guard = match ctx.cfg.compose_policy {
        ComposePolicy::Baseline => {
            let ws = ws.map(|(d, _)| d);
            let dirs = Dirs {
                roots: std::iter::once(src).chain(ws.clone()).collect(),
                writable: ws.into_iter().collect(),
            };
            Some(enforce(ctx, &project, c, dirs, out)?)
        }
        ComposePolicy::Off => None,
    };
    // A single-container deployment of this app (before it became a compose project)
    // would keep serving and be reported next to the project.
    docker.remove(&project.name)?;
    let started = docker
        .compose_up(&project, out)
        .map_err(TaskError::from)
        .and_then(|()| {
            guard
                .as_ref()
                .map_or(Ok(()), |g| g.recheck(ctx, &project, c))
        });
    drop(_env);
    drop(_cfg);
    let port = started.and_then(|()| healthy(ctx, &project, c.service, s.port));
    if let (Err(_), Some(g)) = (&port, &guard) {
        remove_all(ctx, &g.started);
    }
    port
}

/// The exposed service's host port once it is healthy.
fn healthy(ctx: &Ctx, project: &Project, service: &str, port: u16) -> Result<u16, TaskError> {
    let docker = ctx.docker();
    let id = docker.project_container(&project.name, service)?;
    let port = deployer::wait_healthy(ctx, &id, port).map_err(|e| {
        if e.is_canceled() {
            return TaskError::Canceled;
        }
        let mut msg = format!("deploy failed: {e}");
        let logs = docker.logs_tail(&id, 20);
        if !logs.is_empty() {
            msg.push_str(&format!("\nlast log lines of service {service}:\n{logs}"));
        }
        TaskError::Failed(msg)
    })?;
    ctx.say(&format!(
        "Service {service} of {} is healthy, listening on host port {port}.",
        project.name
    ));
    Ok(port)
}

/// Host dirs of the app, as the policy sees them.
struct Dirs {
    /// What the project may mount: its files and the workspace.
    roots: Vec<PathBuf>,
    /// What the app writes outside this deploy: the workspace.
    writable: Vec<PathBuf>,
}

/// A project that passed the policy: the containers judged, and those of them `up` starts.
struct Judged {
    dirs: Dirs,
    ids: Vec<String>,
    started: Vec<String>,
}

/// The compose policy: the project's containers are created (not started) and judged as the
/// engine will run them. When one breaks the policy, what this deploy created is removed
/// (without its volumes: a service compose recreated keeps its anonymous volumes there) and
/// nothing starts.
fn enforce(
    ctx: &Ctx,
    p: &Project,
    c: &ComposeSpec,
    dirs: Dirs,
    out: &mut dyn FnMut(&str),
) -> Result<Judged, TaskError> {
    ctx.say("Checking the project against the compose policy (DEPLOY_COMPOSE_POLICY=baseline)");
    ctx.docker().compose_create(p, out)?;
    let (containers, refused) = judge(ctx, p, &dirs)?;
    let not_running = |k: &&Created| k.status != "running";
    let started: Vec<String> = containers
        .iter()
        .filter(not_running)
        .map(|k| k.id.clone())
        .collect();
    if !refused.is_empty() {
        let created: Vec<String> = containers
            .iter()
            .filter(|k| k.status == "created")
            .map(|k| k.id.clone())
            .collect();
        remove_all(ctx, &created);
        return Err(refusal(c, "nothing was started", &texts(&refused)));
    }
    Ok(Judged {
        dirs,
        ids: containers.into_iter().map(|k| k.id).collect(),
        started,
    })
}

impl Judged {
    /// After `up`: the running project is the judged containers and nothing else (v1 has
    /// connected their other networks only now), else what `up` started is removed.
    fn recheck(&self, ctx: &Ctx, p: &Project, c: &ComposeSpec) -> Result<(), TaskError> {
        let (now, refused) = judge(ctx, p, &self.dirs)?;
        let extra: Vec<&Created> = now.iter().filter(|k| !self.ids.contains(&k.id)).collect();
        let mut list: Vec<String> = refused.iter().map(|v| v.to_string()).collect();
        list.extend(extra.iter().map(|k| {
            format!(
                "service {}: container {} was not there when checked",
                k.service, k.name
            )
        }));
        if list.is_empty() {
            return Ok(());
        }
        remove_all(ctx, &extra.iter().map(|k| k.id.clone()).collect::<Vec<_>>());
        Err(refusal(c, "what it started was removed", &list))
    }
}

/// The project's containers as the engine has them, and how they break the policy.
fn judge(
    ctx: &Ctx,
    p: &Project,
    dirs: &Dirs,
) -> Result<(Vec<Created>, Vec<policy::Violation>), TaskError> {
    let docker = ctx.docker();
    let containers = docker.project_containers(&p.name)?;
    let volumes = containers
        .iter()
        .flat_map(|k| k.mounts.iter().flatten())
        .filter(|m| m.kind == "volume")
        .filter_map(|m| m.name.as_deref());
    let networks = containers.iter().flat_map(|k| {
        let joined = k.networks.iter().flat_map(|n| n.keys());
        joined.chain(std::iter::once(&k.host_config.network_mode))
    });
    let networks = networks.map(String::as_str).filter(|n| {
        !["", "default", "bridge", "none", "host"].contains(n) && !n.starts_with("container:")
    });
    let volumes = docker.volumes(&sorted(volumes))?;
    let networks = docker.networks(&sorted(networks))?;
    let rules = policy::Rules {
        project: &p.name,
        roots: dirs.roots.clone(),
        writable: dirs.writable.clone(),
        volumes: &volumes,
        networks: &networks,
    };
    let refused = policy::judge(&containers, &rules);
    Ok((containers, refused))
}

fn sorted<'a>(names: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    let mut v: Vec<&str> = names.collect();
    v.sort_unstable();
    v.dedup();
    v
}

fn remove_all(ctx: &Ctx, ids: &[String]) {
    for id in ids {
        if let Err(e) = ctx.docker().remove(id) {
            log::warn!("cannot remove container {id}: {e}");
        }
    }
}

fn texts(refused: &[policy::Violation]) -> Vec<String> {
    refused.iter().map(|v| v.to_string()).collect()
}

/// The failed report of a project breaking the policy: every service and key.
fn refusal(c: &ComposeSpec, done: &str, refused: &[String]) -> TaskError {
    TaskError::Invalid(format!(
        "compose file {} breaks the compose policy (DEPLOY_COMPOSE_POLICY=baseline), {done}: {}",
        c.file.display(),
        refused.join("; ")
    ))
}

/// The project as every compose call names it.
fn project(cli: ComposeCli, prefix: &str, src: &Path, file: &Path, work: &Path) -> Project {
    Project {
        cli,
        name: format!("muvee-{prefix}"),
        files: vec![src.join(file), work.join(OVERRIDE)],
        dir: src.to_path_buf(),
        env_file: work.join(CLI_ENV),
        docker_config: None,
    }
}

/// Fetches the compose files into `work/next`, validates them, then replaces `work/src`
/// (the running project keeps its containers: only its files change). Returns `work/src`.
/// Also returns the exposed service's image.
fn stage(
    ctx: &Ctx,
    s: &DeploySpec,
    c: &ComposeSpec,
    cli: ComposeCli,
    work: &Path,
) -> Result<(PathBuf, String, Vec<String>), TaskError> {
    let next = work.join("next");
    remove_dir(&next)?;
    let p = Project {
        files: vec![next.join(&c.file)],
        ..project(cli, s.prefix, &next, &c.file, work)
    };
    let fetched = fetch(ctx, c, work, &next).and_then(|()| validate(ctx, c, &p));
    let (image, names) = match fetched {
        Ok(v) => v,
        Err(e) => {
            let _ = remove_dir(&next);
            return Err(e);
        }
    };
    let src = work.join("src");
    remove_dir(&src)?;
    let err = TaskError::io(format!("cannot move {} into place", next.display()));
    std::fs::rename(&next, &src).map_err(err)?;
    Ok((src, image, names))
}

fn fetch(ctx: &Ctx, c: &ComposeSpec, work: &Path, dest: &Path) -> Result<(), TaskError> {
    match &c.source {
        Source::Inline(yaml) => {
            let path = dest.join(&c.file);
            let parent = path.parent().unwrap_or(dest);
            private_dir(parent)?;
            let err = TaskError::io(format!("cannot write {}", path.display()));
            std::fs::write(&path, yaml).map_err(err)
        }
        Source::Git(git) => {
            let keys = work.join("keys");
            remove_dir(&keys)?;
            private_dir(&keys)?;
            let _keys = Remove(keys.clone());
            let limits = Limits {
                deadline: Some(Deadline {
                    at: Instant::now() + CLONE_TIMEOUT,
                    total: CLONE_TIMEOUT,
                    setting: "the compose clone limit",
                }),
                idle: Some(ctx.cfg.build_idle_timeout),
            };
            builder::clone_source(ctx, git, &keys, dest, limits).map(drop)
        }
    }
}

/// Every service has `image:` and no `build:`, and `expose_service` is one of them; read
/// from `compose config` (the CLI's own parse of the staged file `p` names) with an empty
/// `.env`, so no value is printed. Under the compose policy, what the CLI would read of the
/// host is judged first, and the labels and networks it sets after. Returns the exposed
/// service's image and the names of all services.
fn validate(ctx: &Ctx, c: &ComposeSpec, p: &Project) -> Result<(String, Vec<String>), TaskError> {
    builder::file_in(&p.dir, &c.file, "compose_file_path")?;
    let shown = c.file.display();
    let policy = ctx.cfg.compose_policy == ComposePolicy::Baseline;
    if policy {
        let refused = reads::judge(&p.dir, &c.file).map_err(|e| TaskError::Invalid(e.0))?;
        if !refused.is_empty() {
            return Err(refusal(c, "nothing was started", &texts(&refused)));
        }
    }
    let env = Remove(write_env(&p.dir, &[], p.cli)?);
    let text = ctx
        .docker()
        .compose_config(p)
        .map_err(|e| TaskError::from(e).context(format!("compose file {shown} is not valid")))?;
    drop(env);
    let config = yaml::load(&text).map_err(|e| {
        TaskError::Invalid(format!(
            "compose file {shown}: cannot read `compose config`: {e}"
        ))
    })?;
    let services = services(&config);
    for svc in &services {
        if svc.build {
            return Err(TaskError::Invalid(format!(
                "compose file {shown}: service {} has `build:`; the deploy role only runs images",
                svc.name
            )));
        }
        if svc.image.is_none() {
            return Err(TaskError::Invalid(format!(
                "compose file {shown}: service {} has no `image:`",
                svc.name
            )));
        }
    }
    let Some(exposed) = services.iter().find(|svc| svc.name == c.service) else {
        let names: Vec<&str> = services.iter().map(|s| s.name.as_str()).collect();
        return Err(TaskError::Invalid(format!(
            "payload field `expose_service`: {:?} is not a service of {shown} (it has: {})",
            c.service,
            names.join(", ")
        )));
    };
    let mut refused = policy::config_labels(&config);
    refused.extend(policy::config_networks(&config, &p.name));
    if policy && !refused.is_empty() {
        return Err(refusal(c, "nothing was started", &texts(&refused)));
    }
    let names = services.iter().map(|s| s.name.clone()).collect();
    Ok((exposed.image.clone().unwrap_or_default(), names))
}

/// A service as `compose config` prints it.
#[derive(Debug, PartialEq, Eq)]
struct Service {
    name: String,
    image: Option<String>,
    build: bool,
}

/// The services of `compose config`'s normalised YAML.
fn services(config: &Yaml) -> Vec<Service> {
    let all = yaml::entries(yaml::get(config, "services").unwrap_or(&Yaml::Null));
    all.into_iter()
        .map(|(name, s)| Service {
            name: name.to_string(),
            image: yaml::get(s, "image")
                .and_then(Yaml::as_str)
                .map(String::from),
            build: yaml::get(s, "build").is_some(),
        })
        .collect()
}

/// A YAML double-quoted scalar.
fn yaml_quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// `muvee.override.yml`: the exposed service's published port (random unless fixed), our
/// labels, the workspace volume and the memory limit; every service gets the ownership
/// labels (app, node), so none carries another app's or node's whatever its file says.
fn write_override(
    ctx: &Ctx,
    s: &DeploySpec,
    c: &ComposeSpec,
    names: &[String],
    work: &Path,
    mount: Option<&str>,
) -> Result<(), TaskError> {
    let q = yaml_quote;
    let publish = match s.fixed_port {
        Some(f) => format!("{f}:{}", s.port),
        None => s.port.to_string(),
    };
    let owner = [
        ("muvee.domain_prefix", s.prefix),
        ("muvee.managed", "true"),
        ("muvee.node", ctx.cfg.node_name.as_str()),
    ];
    let mut y = String::from("services:\n");
    for name in names.iter().filter(|n| *n != c.service) {
        y.push_str(&format!("  {}:\n    labels:\n", q(name)));
        for (k, v) in owner {
            y.push_str(&format!("      {}: {}\n", q(k), q(v)));
        }
    }
    y.push_str(&format!(
        "  {}:\n    ports:\n      - {}\n    labels:\n",
        q(c.service),
        q(&publish)
    ));
    let port = s.port.to_string();
    let exposed = [
        ("muvee.expose_port", port.as_str()),
        ("muvee.deployment_id", s.deployment_id),
    ];
    for (k, v) in owner.iter().chain(&exposed) {
        y.push_str(&format!("      {}: {}\n", q(k), q(v)));
    }
    if let Some(mount) = mount {
        y.push_str(&format!("    volumes:\n      - {}\n", q(mount)));
    }
    if !s.memory.is_empty() {
        y.push_str(&format!(
            "    mem_limit: {}\n    memswap_limit: {}\n",
            q(s.memory),
            q(s.memory)
        ));
    }
    let path = work.join(OVERRIDE);
    let err = TaskError::io(format!("cannot write {}", path.display()));
    std::fs::write(&path, y).map_err(err)
}

/// Writes `dir/.env` (0600, replacing any the repository has) and returns its path. Only
/// services that name it in `env_file:` read it: the CLI reads [`CLI_ENV`] instead.
fn write_env(dir: &Path, env: &[(String, String)], cli: ComposeCli) -> Result<PathBuf, TaskError> {
    let mut text = String::new();
    for (k, v) in env {
        text.push_str(&format!("{k}={}\n", env_value(k, v, cli)?));
    }
    write_file(dir, ".env", &text)
}

/// Writes `dir/name` (0600), replacing what is there.
fn write_file(dir: &Path, name: &str, text: &str) -> Result<PathBuf, TaskError> {
    remove_file(&dir.join(name))?;
    builder::write_private(dir, name, text.as_bytes())
}

fn remove_file(path: &Path) -> Result<(), TaskError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(TaskError::Io {
            what: format!("cannot remove {}", path.display()),
            err: e,
        }),
        _ => Ok(()),
    }
}

/// One `.env` value quoted so the CLI reads back exactly `v`.
///
/// v1 reads `.env` with python-dotenv: single quotes keep newlines and `#`, and only `\\`
/// and `\'` are escapes; it expands `${...}` even there, and reads the file with universal
/// newlines (a CR becomes LF), so those two cannot round-trip and are refused.
/// v2 (compose-go): double quotes with Go escapes (`\n`, `\r`, `\\`, `\"`) and `\$` for a
/// literal `$`.
fn env_value(k: &str, v: &str, cli: ComposeCli) -> Result<String, Invalid> {
    match cli {
        ComposeCli::Standalone => {
            let why = if v.contains("${") {
                "docker-compose (v1) expands `${` in .env values"
            } else if v.contains('\r') {
                "docker-compose (v1) reads a carriage return in .env as a newline"
            } else {
                return Ok(format!(
                    "'{}'",
                    v.replace('\\', "\\\\").replace('\'', "\\'")
                ));
            };
            Err(Invalid(format!(
                "payload field `env_vars.{k}`: {why}; install docker compose (v2) for such values"
            )))
        }
        ComposeCli::Plugin => {
            let mut q = String::from("\"");
            for c in v.chars() {
                match c {
                    '\\' => q.push_str("\\\\"),
                    '"' => q.push_str("\\\""),
                    '\n' => q.push_str("\\n"),
                    '\r' => q.push_str("\\r"),
                    '$' => q.push_str("\\$"),
                    c => q.push(c),
                }
            }
            q.push('"');
            Ok(q)
        }
    }
}

/// The agent's own docker config dir: DOCKER_CONFIG, else ~/.docker.
fn own_docker_config() -> Option<PathBuf> {
    match std::env::var_os("DOCKER_CONFIG") {
        Some(d) if !d.is_empty() => Some(PathBuf::from(d)),
        _ => std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker")),
    }
}

/// A private DOCKER_CONFIG (`work/dockercfg`, 0700, config.json 0600) with the agent's own
/// config plus the owner's logins, and the CLI plugins of the agent's config reachable.
fn docker_config(work: &Path, auths: &[Auth]) -> Result<PathBuf, TaskError> {
    let dir = work.join("dockercfg");
    remove_dir(&dir)?;
    private_dir(&dir)?;
    let own = own_docker_config();
    let mut cfg = own
        .as_ref()
        .and_then(|d| std::fs::read(d.join("config.json")).ok())
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .filter(|v| v.is_object())
        .unwrap_or_else(|| serde_json::json!({}));
    // A credential store would answer for every registry instead of our `auths`.
    if let Some(o) = cfg.as_object_mut() {
        o.remove("credsStore");
        if !o.get("auths").is_some_and(|a| a.is_object()) {
            o.insert("auths".into(), serde_json::json!({}));
        }
    }
    for a in auths {
        let key = match a.addr.as_str() {
            "docker.io" | "index.docker.io" | "registry-1.docker.io" => {
                "https://index.docker.io/v1/"
            }
            other => other,
        };
        if let Some(h) = cfg.get_mut("credHelpers").and_then(|h| h.as_object_mut()) {
            h.remove(key);
        }
        if let Some(list) = cfg.get_mut("auths").and_then(|l| l.as_object_mut()) {
            list.insert(key.into(), serde_json::json!({ "auth": a.basic }));
        }
    }
    let text = serde_json::to_vec_pretty(&cfg).unwrap_or_default();
    builder::write_private(&dir, "config.json", &text)?;
    if let Some(plugins) = own.map(|d| d.join("cli-plugins")).filter(|p| p.is_dir()) {
        let link = dir.join("cli-plugins");
        let err = TaskError::io(format!("cannot link {}", link.display()));
        std::os::unix::fs::symlink(plugins, &link).map_err(err)?;
    }
    Ok(dir)
}

/// `cleanup` with `mode:"compose"`: `compose down -v --remove-orphans` while the project's
/// files are there (errors only logged), then every container, network and volume labelled
/// with the project, then the work dir. Works when the work dir is gone.
pub fn cleanup(ctx: &Ctx) -> Result<(), TaskError> {
    let p = Payload::of(&ctx.task.payload)?;
    let prefix = spec::domain_prefix(&p)?;
    let file = spec::compose_file(&p)?;
    let key = deployer::lock_key(prefix);
    ctx.exclusive(&key, || {
        let docker = ctx.docker();
        let work = work_dir(ctx, prefix);
        let src = work.join("src");
        if src.join(&file).is_file() && may_read(ctx, &src, &file) {
            down(&docker, prefix, &src, &file, &work);
        }
        docker.remove_project(&format!("muvee-{prefix}"))?;
        remove_dir(&work)
    })
}

/// Whether the compose CLI may read the project's files again: the app may have changed them
/// through a read-write mount since they were judged.
fn may_read(ctx: &Ctx, src: &Path, file: &Path) -> bool {
    if ctx.cfg.compose_policy == ComposePolicy::Off {
        return true;
    }
    let refused = match reads::judge(src, file) {
        Ok(v) if v.is_empty() => return true,
        Ok(v) => texts(&v).join("; "),
        Err(e) => e.0,
    };
    log::warn!("compose down of {}: skipped, {refused}", src.display());
    false
}

fn down(docker: &Docker, prefix: &str, src: &Path, file: &Path, work: &Path) {
    let Some(cli) = docker.compose_cli() else {
        return;
    };
    let mut p = project(cli, prefix, src, file, work);
    p.files.retain(|f| f.is_file());
    // The files may name `.env` (image projects do); its values are gone, not needed here.
    let env = write_env(src, &[], cli).map(Remove);
    if let Err(e) = write_file(work, CLI_ENV, "") {
        log::warn!("compose down of {}: {e}", p.name);
        return;
    }
    if let Err(e) = docker.compose_down(&p) {
        log::warn!("compose down of {}: {e}", p.name);
    }
    drop(env);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::fake::Reply;
    use crate::work::ctx::testing::Harness;
    use crate::work::dispatch;
    use base64::engine::general_purpose::STANDARD as BASE64;
    use base64::Engine;
    use serde_json::json;
    use std::sync::Arc;

    const INLINE: &str =
        "services:\n  app:\n    image: r/app:1\n    restart: unless-stopped\n    env_file:\n      - .env\n";
    const CONFIG: &str = "services:\n  app:\n    environment:\n      A: \"x\n        y: z\"\n    image: r/app:1\n  db:\n    image: postgres\n    volumes:\n    - build:/x\nvolumes:\n  build: {}\n";

    fn node(name: &str) -> Harness {
        let h = Harness::new(name, &[("NODE_ROLE", "deploy")]);
        let f = &h.fake;
        f.on("docker compose version", Reply::Fail(1, "unknown".into()));
        f.on("docker-compose version", Reply::Ok("1.29.2".into()));
        f.on("docker-compose -p muvee-app", Reply::Ok(String::new()));
        f.on(
            "docker-compose -p muvee-app -f",
            Reply::With(Arc::new(|cmd| {
                let args: Vec<String> = cmd
                    .args
                    .iter()
                    .map(|a| a.to_string_lossy().into_owned())
                    .collect();
                Ok(match args.last().map(String::as_str) {
                    Some("config") => CONFIG.into(),
                    _ => String::new(),
                })
            })),
        );
        f.on(
            "docker ps -q --filter label=com.docker.compose.project=muvee-app",
            Reply::Ok("0123abcd\n".into()),
        );
        f.on(
            "docker inspect --format",
            Reply::Ok("running 0 0 false".into()),
        );
        h
    }

    fn payload(extra: serde_json::Value) -> serde_json::Value {
        let mut p = json!({"mode": "compose", "domain_prefix": "app", "project_id": "p1",
                           "inline_compose_yaml": INLINE, "expose_service": "app",
                           "expose_port": 8080, "env_vars": {}});
        if let (Some(p), Some(extra)) = (p.as_object_mut(), extra.as_object()) {
            p.extend(extra.clone());
        }
        p
    }

    fn text(r: &Result<u16, TaskError>) -> String {
        match r {
            Ok(p) => format!("ok {p}"),
            Err(e) => dispatch::report(e).result.unwrap_or_default(),
        }
    }

    #[test]
    fn normalised_config_yields_services_and_their_keys() {
        let s = services(&yaml::load(CONFIG).unwrap());
        assert_eq!(
            s,
            vec![
                Service {
                    name: "app".into(),
                    image: Some("r/app:1".into()),
                    build: false
                },
                Service {
                    name: "db".into(),
                    image: Some("postgres".into()),
                    build: false
                },
            ]
        );
        let s = services(
            &yaml::load(
                "version: '3'\nservices:\n    'web':\n        build:\n            context: .\n",
            )
            .unwrap(),
        );
        assert_eq!(
            s,
            vec![Service {
                name: "web".into(),
                image: None,
                build: true
            }]
        );
    }

    #[test]
    fn env_values_are_quoted_for_each_cli() {
        let v1 = |v: &str| env_value("K", v, ComposeCli::Standalone);
        assert_eq!(v1("a b # c").unwrap(), "'a b # c'");
        assert_eq!(v1("it's \\ \"q\"\nx").unwrap(), "'it\\'s \\\\ \"q\"\nx'");
        assert!(v1("${HOME}").unwrap_err().0.contains("env_vars.K"));
        assert!(v1("a\rb").is_err());
        let v2 = |v: &str| env_value("K", v, ComposeCli::Plugin).unwrap();
        assert_eq!(v2("a\"b\\c\nd\re$f #g"), "\"a\\\"b\\\\c\\nd\\re\\$f #g\"");
    }

    #[test]
    fn a_deploy_validates_writes_the_override_and_removes_env() {
        let h = node("cmp-ok");
        let r = h.with(
            "deploy",
            payload(json!({"fixed_host_port": 1, "memory_limit": "64m",
                           "env_vars": {"SECRET": "line1\n#two 'q'"}})),
            deploy,
        );
        // Port 1 answers nothing: the health check fails, after `up`.
        assert!(text(&r).contains("deploy failed"), "{}", text(&r));
        let calls = h.fake.calls();
        let pos = |p: &str| calls.iter().position(|c| c.contains(p)).unwrap();
        assert!(
            pos(" config") < pos(" pull")
                && pos(" pull") < pos(" up -d --no-recreate --remove-orphans")
        );
        assert!(pos("docker rm -f muvee-app") < pos(" up -d"));
        let work = h.cfg.data_dir.join("compose/app");
        let o = std::fs::read_to_string(work.join(OVERRIDE)).unwrap();
        assert!(o.contains("- \"1:8080\""), "{o}");
        assert!(o.contains("\"muvee.domain_prefix\": \"app\""), "{o}");
        assert!(o.contains("mem_limit: \"64m\""), "{o}");
        assert!(!work.join("src/.env").exists());
        assert!(work.join("src/docker-compose.yml").is_file());
    }

    #[test]
    fn a_project_breaking_the_policy_is_removed_and_never_started() {
        let h = node("cmp-policy");
        h.fake.on(
            "docker ps -aq --filter label=com.docker.compose.project=muvee-app",
            Reply::Ok("0123abcd\n".into()),
        );
        let created = r#"{"Id":"0123abcd","Name":"/muvee-app_db_1","Status":"created","Service":"db",
            "HostConfig":{"Privileged":true,"NetworkMode":"host","CapAdd":null},"Mounts":[]}"#;
        h.fake.on(
            "docker inspect --type container --format",
            Reply::Ok(created.replace('\n', "")),
        );
        let r = h.with("deploy", payload(json!({})), deploy);
        assert_eq!(
            text(&r),
            "compose file docker-compose.yml breaks the compose policy (DEPLOY_COMPOSE_POLICY=baseline), nothing was started: service db: `privileged` is true; service db: `network_mode` is \"host\""
        );
        let calls = h.fake.calls();
        let pos = |p: &str| calls.iter().position(|c| c.contains(p));
        assert!(
            pos(" up --no-start --remove-orphans").unwrap() < pos("docker rm -f 0123abcd").unwrap()
        );
        assert_eq!(pos(" up -d"), None, "{calls:#?}");
    }

    #[test]
    fn a_container_that_appears_after_the_check_is_refused_and_what_up_started_removed() {
        let h = node("cmp-recheck");
        let judged = r#"{"Id":"aaaa","Name":"/muvee-app_app_1","Status":"created","Service":"app","HostConfig":{},"Mounts":[]}"#;
        let extra = r#"{"Id":"bbbb","Name":"/muvee-app_evil_1","Status":"running","Service":"evil","HostConfig":{},"Mounts":[]}"#;
        let ps = "docker ps -aq --filter label=com.docker.compose.project=muvee-app";
        let inspect = "docker inspect --type container --format";
        // After `up`: one more container than was judged.
        h.fake.on(ps, Reply::Ok("aaaa\nbbbb\n".into()));
        h.fake.on(inspect, Reply::Ok(format!("{judged}\n{extra}")));
        h.fake.once(ps, Reply::Ok("aaaa\n".into()));
        h.fake.once(inspect, Reply::Ok(judged.into()));
        let r = h.with("deploy", payload(json!({})), deploy);
        assert_eq!(
            text(&r),
            "compose file docker-compose.yml breaks the compose policy (DEPLOY_COMPOSE_POLICY=baseline), what it started was removed: service evil: container /muvee-app_evil_1 was not there when checked"
        );
        let calls = h.fake.calls();
        let pos = |p: &str| calls.iter().position(|c| c.contains(p));
        let up = pos(" up -d --no-recreate").unwrap();
        assert!(up < pos("docker rm -f bbbb").unwrap(), "{calls:#?}");
        assert!(up < pos("docker rm -f aaaa").unwrap(), "{calls:#?}");
    }

    #[test]
    fn refused_payloads_name_the_field_and_run_nothing() {
        let cases = [
            (
                json!({"compose_file_path": "../x.yml"}),
                "payload field `compose_file_path`",
            ),
            (
                json!({"expose_service": "-x"}),
                "payload field `expose_service`",
            ),
            (json!({"expose_port": 70000}), "payload field `expose_port`"),
            (
                json!({"inline_compose_yaml": ""}),
                "`git_url` or `inline_compose_yaml`",
            ),
            (
                json!({"git_url": "ext::sh", "inline_compose_yaml": null}),
                "payload field `git_url`",
            ),
            (
                json!({"registry_auths": [{"addr": "r", "username": "", "password": "pw12"}]}),
                "payload field `registry_auths[0].username`",
            ),
            (
                json!({"domain_prefix": "../x"}),
                "payload field `domain_prefix`",
            ),
        ];
        for (extra, expect) in cases {
            let h = node("cmp-bad");
            let r = h.with("deploy", payload(extra.clone()), deploy);
            assert!(text(&r).contains(expect), "{extra}: {}", text(&r));
            assert!(h.fake.calls().is_empty(), "{extra}: {:?}", h.fake.calls());
        }
    }

    #[test]
    fn a_service_without_image_or_the_wrong_expose_service_stops_before_pull() {
        let h = node("cmp-svc");
        let r = h.with("deploy", payload(json!({"expose_service": "web"})), deploy);
        assert!(
            text(&r).contains("`expose_service`: \"web\" is not a service of docker-compose.yml (it has: app, db)"),
            "{}",
            text(&r)
        );
        assert!(h
            .fake
            .ran("docker-compose")
            .iter()
            .all(|c| !c.contains(" pull")));
        // The staging dir goes; nothing replaced the running project's files.
        assert!(!h.cfg.data_dir.join("compose/app/next").exists());
        assert!(!h.cfg.data_dir.join("compose/app/src").exists());
    }

    #[test]
    fn registry_logins_live_in_a_private_config_only_during_the_deploy() {
        let h = node("cmp-auth");
        let seen = Arc::new(std::sync::Mutex::new(String::new()));
        let s2 = seen.clone();
        h.fake.on(
            "docker-compose -p muvee-app -f",
            Reply::With(Arc::new(move |cmd| {
                let last = cmd.args.last().map(|a| a.to_string_lossy().into_owned());
                if last.as_deref() == Some("pull") {
                    let dir = &cmd
                        .env
                        .iter()
                        .find(|(k, _)| k == "DOCKER_CONFIG")
                        .unwrap()
                        .1;
                    *s2.lock().unwrap() =
                        std::fs::read_to_string(Path::new(dir).join("config.json")).unwrap();
                }
                Ok(match last.as_deref() {
                    Some("config") => CONFIG.into(),
                    _ => String::new(),
                })
            })),
        );
        let auths = json!({"registry_auths": [{"addr": "reg:5000", "username": "u", "password": "pw-9f8e7d"}]});
        let _ = h.with("deploy", payload(auths), deploy);
        let cfg = seen.lock().unwrap().clone();
        assert!(cfg.contains(&BASE64.encode("u:pw-9f8e7d")), "{cfg}");
        assert!(!h.cfg.data_dir.join("compose/app/dockercfg").exists());
        assert!(h.fake.calls().iter().all(|c| !c.contains("pw-9f8e7d")));
    }

    #[test]
    fn cleanup_never_has_the_cli_read_files_the_app_changed_to_name_host_files() {
        let h = node("cmp-clean-changed");
        let src = h.cfg.data_dir.join("compose/app/src");
        std::fs::create_dir_all(&src).unwrap();
        let changed = "services:\n  app:\n    image: i\n    env_file: /etc/shadow\n";
        std::fs::write(src.join("docker-compose.yml"), changed).unwrap();
        let p = json!({"mode": "compose", "domain_prefix": "app"});
        assert!(h.with("cleanup", p.clone(), cleanup).is_ok());
        assert!(h.fake.ran("docker-compose -p").is_empty());
        assert!(!h.cfg.data_dir.join("compose/app").exists());
        // The project's own files: `down` runs.
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("docker-compose.yml"), INLINE).unwrap();
        assert!(h.with("cleanup", p, cleanup).is_ok());
        assert!(!h.fake.ran("docker-compose -p").is_empty());
    }

    #[test]
    fn cleanup_works_without_the_work_dir() {
        let h = node("cmp-clean");
        let r = h.with(
            "cleanup",
            json!({"mode": "compose", "domain_prefix": "app"}),
            cleanup,
        );
        assert!(r.is_ok());
        assert!(h.fake.ran("docker-compose -p").is_empty());
        let filter = "--filter label=com.docker.compose.project=muvee-app";
        for c in [
            "docker ps -aq",
            "docker network ls -q",
            "docker volume ls -q",
        ] {
            assert!(!h.fake.ran(&format!("{c} {filter}")).is_empty(), "{c}");
        }
    }
}
