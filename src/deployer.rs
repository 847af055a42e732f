//! Deploy role: runs an app image as `muvee-<domain_prefix>` and reports its host port.
//!
//! Unlike the Go agent (which removes the running container first, W-12), a replacement
//! never interrupts the app: the old container is renamed aside and keeps serving until
//! the new one answers HTTP; on any failure the new one is removed and the old one renamed
//! back. The old one is removed after DEPLOY_DRAIN, in the background, because the control
//! plane only switches Traefik to the new port once it has our report.

use crate::config::Config;
use crate::datasets::{self, Dataset};
use crate::executor::{self, Cmd};
use crate::tasks::Ctx;
use crate::wire::Payload;
use crate::{redact, signal};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Short docker calls (ps, inspect, rm, port) must never hang a task.
pub const DOCKER_SHORT: Duration = Duration::from_secs(60);
/// Pulling a large image over a slow link.
const PULL_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// `docker run -d` copies the image's layers on some storage drivers (vfs).
const RUN_TIMEOUT: Duration = Duration::from_secs(5 * 60);
const PROBE_EVERY: Duration = Duration::from_millis(250);

/// `domain_prefix` becomes a container name and a Traefik host: it must be a DNS label.
pub fn domain_prefix<'a>(p: &Payload<'a>) -> Result<&'a str, String> {
    let v = p.required("domain_prefix")?;
    let ok = v.len() <= 63
        && v.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !v.starts_with('-')
        && !v.ends_with('-');
    if !ok {
        return Err(format!(
            "payload field `domain_prefix`: {v:?} is not a DNS label (a-z, 0-9, '-', at most 63)"
        ));
    }
    Ok(v)
}

/// A validated deploy payload.
struct Spec<'a> {
    image: &'a str,
    prefix: &'a str,
    deployment_id: &'a str,
    port: u16,
    fixed_port: Option<u16>,
    memory: &'a str,
    /// Workspace volume: host dir and container path.
    workspace: Option<(PathBuf, &'a str)>,
    env: Vec<(String, String)>,
    datasets: Vec<Dataset>,
}

pub fn deploy(ctx: &Ctx) -> Result<u16, String> {
    let p = Payload::of(&ctx.task.payload)?;
    let spec = parse(ctx, &p)?;
    ctx.shared
        .locks
        .with(&lock_key(spec.prefix), || replace(ctx, &spec))
}

fn lock_key(prefix: &str) -> String {
    format!("deploy:{prefix}")
}

/// Checks the whole payload before anything runs; every error names its field.
fn parse<'a>(ctx: &'a Ctx, p: &Payload<'a>) -> Result<Spec<'a>, String> {
    let env = p.string_map("env_vars")?;
    // Registered first, so nothing logged from here on can show a value.
    for (_, v) in &env {
        redact::add_weak(v);
    }
    let prefix = domain_prefix(p)?;
    let image = p.required("image_tag")?;
    if !image_ref(image) {
        return Err(format!(
            "payload field `image_tag`: {image:?} is not an image reference"
        ));
    }
    let deployment_id = match p.str("deployment_id")? {
        "" => ctx.task.deployment_id.as_str(),
        d => d,
    };
    if !crate::state::valid_id(deployment_id) {
        return Err(format!(
            "payload field `deployment_id`: {deployment_id:?} is not a valid id"
        ));
    }
    let port_field = |key: &str| -> Result<Option<u16>, String> {
        match p.uint(key)? {
            None | Some(0) => Ok(None),
            Some(n) => u16::try_from(n)
                .map(Some)
                .map_err(|_| format!("payload field `{key}`: {n} is not a port (1-65535)")),
        }
    };
    let port = port_field("container_port")?.unwrap_or(8080);
    let fixed_port = port_field("fixed_host_port")?;
    let memory = p.str("memory_limit")?.trim();
    if !memory.is_empty() && !docker_size(memory) {
        return Err(format!(
            "payload field `memory_limit`: {memory:?} is not a size like 512m or 4g"
        ));
    }
    let mount_path = p.str("volume_mount_path")?;
    if !mount_path.is_empty() && !container_path(mount_path) {
        return Err(format!(
            "payload field `volume_mount_path`: {mount_path:?} must be an absolute path without '..', ':' or ','"
        ));
    }
    let base = ctx.cp.volume_nfs_base_path.trim();
    let workspace = if !mount_path.is_empty() && !base.is_empty() {
        let project = p.required("project_id")?;
        if !crate::state::valid_id(project) {
            return Err(format!(
                "payload field `project_id`: {project:?} is not a valid id"
            ));
        }
        if base.contains([':', ',']) {
            return Err(format!(
                "volume NFS base path {base:?} contains ':' or ',', which docker -v cannot take"
            ));
        }
        Some((Path::new(base).join(project), mount_path))
    } else {
        None
    };
    for (k, v) in &env {
        if !env_name(k) {
            return Err(format!(
                "payload field `env_vars`: {k:?} is not a variable name ([A-Za-z_][A-Za-z0-9_]*)"
            ));
        }
        if v.contains('\0') {
            return Err(format!(
                "payload field `env_vars.{k}`: the value contains a NUL byte"
            ));
        }
        if cli_reads(k) && v.contains(['\n', '\r']) {
            return Err(format!(
                "payload field `env_vars.{k}`: a value with a line break cannot be passed for a name the docker CLI reads itself"
            ));
        }
    }
    let datasets = datasets::parse(p, ctx.cp)?;
    Ok(Spec {
        image,
        prefix,
        deployment_id,
        port,
        fixed_port,
        memory,
        workspace,
        env,
        datasets,
    })
}

/// `[registry[:port]/]path[:tag][@digest]`, loosely: the daemon has the final word, this
/// only keeps option-like and malformed values away from argv.
fn image_ref(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 512
        && !s.starts_with(['-', '/', ':', '@', '.'])
        && !s.ends_with(['/', ':', '@'])
        && !s.contains("//")
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-/:@".contains(&b))
}

/// Docker's RAMInBytes syntax: `123`, `1.5g`, `512MB`, `4GiB`.
fn docker_size(s: &str) -> bool {
    let digits = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(digits);
    let unit = unit.to_ascii_lowercase();
    let unit = unit.trim_start_matches(' ');
    num.parse::<f64>().is_ok_and(|n| n.is_finite())
        && matches!(
            unit,
            "" | "b"
                | "k"
                | "kb"
                | "kib"
                | "m"
                | "mb"
                | "mib"
                | "g"
                | "gb"
                | "gib"
                | "t"
                | "tb"
                | "tib"
        )
}

fn container_path(p: &str) -> bool {
    p.starts_with('/')
        && !p.contains([':', ',', '\0'])
        && !Path::new(p).components().any(|c| c.as_os_str() == "..")
}

fn env_name(k: &str) -> bool {
    let mut b = k.bytes();
    b.next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == b'_')
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_')
}

/// Names the docker CLI (a Go program, often root) or the dynamic loader read themselves.
/// Setting these in the CLI's environment would change what our `docker run` does (another
/// daemon, LD_PRELOAD...), so they go through `--env-file /dev/stdin` instead of `-e NAME`.
fn cli_reads(k: &str) -> bool {
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

/// A container of one app, from `docker ps`.
#[derive(Clone, Debug)]
struct Container {
    id: String,
    name: String,
    running: bool,
    deployment_id: String,
}

/// The app's current container and the leftovers of interrupted replacements.
fn app_containers(
    cfg: &Config,
    prefix: &str,
) -> Result<(Option<Container>, Vec<Container>), String> {
    let main = format!("muvee-{prefix}");
    let aside = format!("muvee-{prefix}-old-");
    let out = docker_out(
        cfg,
        &[
            "ps",
            "-a",
            "--filter",
            &format!("name={main}"),
            "--format",
            "{{.ID}}\t{{.Names}}\t{{.State}}\t{{.Label \"muvee.domain_prefix\"}}\t{{.Label \"muvee.deployment_id\"}}",
        ],
    )?;
    let (mut current, mut leftovers) = (None, Vec::new());
    for line in out.lines() {
        let f: Vec<&str> = line.split('\t').collect();
        let [id, name, state, label, dep] = f[..] else {
            continue;
        };
        let c = Container {
            id: id.to_string(),
            name: name.to_string(),
            running: state == "running",
            deployment_id: dep.to_string(),
        };
        if name == main {
            current = Some(c);
        } else if name.starts_with(&aside) && (label.is_empty() || label == prefix) {
            // Another app may be called `<prefix>-old-x`: its label says so.
            leftovers.push(c);
        }
    }
    Ok((current, leftovers))
}

fn replace(ctx: &Ctx, s: &Spec) -> Result<u16, String> {
    let r = replace_inner(ctx, s);
    if r.is_err() {
        // This deployment's mount dir, unless the container that keeps running uses it.
        let (current, _) = app_containers(ctx.cfg, s.prefix).unwrap_or_default();
        if current.map_or(true, |c| c.deployment_id != s.deployment_id) {
            let _ = datasets::remove_mounts(&ctx.cfg.data_dir, s.deployment_id);
        }
    }
    r
}

fn replace_inner(ctx: &Ctx, s: &Spec) -> Result<u16, String> {
    let cfg = ctx.cfg;
    // A previous deploy of this app may still be draining its old container.
    wait_retirements(Some(s.prefix));
    ensure_image(ctx, s.image)?;
    let mounts = datasets::setup(ctx, s.deployment_id, &s.datasets)?;
    let mut volumes = mounts.volumes.clone();
    if let Some((dir, path)) = &s.workspace {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create workspace {}: {e}", dir.display()))?;
        let dir =
            std::fs::canonicalize(dir).map_err(|e| format!("workspace {}: {e}", dir.display()))?;
        volumes.push(format!("{}:{path}:rw", dir.display()));
    }

    let name = format!("muvee-{}", s.prefix);
    let (current, mut leftovers) = app_containers(cfg, s.prefix)?;
    let old = match current {
        Some(c) => {
            let aside = format!("muvee-{}-old-{}", s.prefix, &c.id[..c.id.len().min(12)]);
            ctx.say(&format!(
                "Renaming the current container to {aside}; it keeps serving until the new one is healthy"
            ));
            rename(cfg, &name, &aside)?;
            Some(Container { name: aside, ..c })
        }
        // The agent died after renaming the old container aside: that one still serves
        // (Traefik points at it), so it is the one to restore on failure.
        None => leftovers
            .iter()
            .position(|c| c.running)
            .map(|i| leftovers.remove(i))
            .inspect(|c| {
                ctx.say(&format!(
                    "{} was left aside by an interrupted deploy; it keeps serving until the new one is healthy",
                    c.name
                ))
            }),
    };
    // A fixed host port cannot be bound twice: the old container has to let go first.
    let holds_fixed = |o: &Container| {
        let ports = docker_out(cfg, &["port", &o.name]).unwrap_or_default();
        ports
            .lines()
            .any(|l| parse_host_port(l).map(|p| p.0) == s.fixed_port)
    };
    let stopped = match (&old, s.fixed_port) {
        (Some(o), Some(fixed)) if o.running && holds_fixed(o) => {
            ctx.say(&format!(
                "Stopping {} to free fixed host port {fixed}",
                o.name
            ));
            if let Err(e) = docker_out(cfg, &["stop", "-t", "10", &o.name]) {
                let _ = rename(cfg, &o.name, &name);
                return Err(format!("cannot stop the current container: {e}"));
            }
            true
        }
        _ => false,
    };

    let started = start(ctx, s, &name, &volumes).and_then(|()| wait_healthy(ctx, s, &name));
    match started {
        Ok(port) => {
            ctx.say(&format!(
                "Container {name} is healthy, listening on host port {port}."
            ));
            let mut victims = leftovers;
            let drain = match old {
                Some(o) => {
                    let serving = o.running && !stopped;
                    victims.push(o);
                    if serving {
                        cfg.deploy_drain
                    } else {
                        Duration::ZERO
                    }
                }
                None => Duration::ZERO,
            };
            if !victims.is_empty() {
                if !drain.is_zero() {
                    ctx.say(&format!(
                        "The previous container is removed after {} (DEPLOY_DRAIN).",
                        executor::fmt_duration(drain)
                    ));
                }
                retire(cfg, s.prefix, s.deployment_id, victims, drain);
            }
            Ok(port)
        }
        Err(reason) => {
            let logs = last_logs(cfg, &name);
            let mut msg = format!("deploy failed: {reason}");
            if let Err(e) = rm_container(cfg, &name) {
                msg.push_str(&format!("; could not remove the new container: {e}"));
            }
            if let Some(o) = &old {
                let back = rename(cfg, &o.name, &name).and_then(|()| {
                    if stopped {
                        docker_out(cfg, &["start", &name])?;
                        // Report only once the restored app serves again (best effort).
                        let until = Instant::now() + cfg.deploy_health_timeout;
                        let port = s.fixed_port.unwrap_or_default();
                        while !http_answers(port, true) && Instant::now() < until {
                            std::thread::sleep(PROBE_EVERY);
                        }
                    }
                    Ok(())
                });
                match back {
                    Ok(()) if o.running => msg.push_str("; the previous container keeps serving"),
                    Ok(()) => msg.push_str(&format!("; the previous container is back as {name}")),
                    Err(e) => msg.push_str(&format!(
                        "; could not restore the previous container {}: {e}",
                        o.name
                    )),
                }
            }
            if !logs.is_empty() {
                msg.push_str(&format!("\nlast log lines of the new container:\n{logs}"));
            }
            Err(msg)
        }
    }
}

/// Pulls the image unless it is present, so a bad tag fails before anything is touched.
fn ensure_image(ctx: &Ctx, image: &str) -> Result<(), String> {
    if docker_out(ctx.cfg, &["image", "inspect", "--format", "{{.Id}}", image]).is_ok() {
        return Ok(());
    }
    ctx.say(&format!("Pulling {image}..."));
    let cmd = docker(ctx.cfg, &["pull", image]).timeout(PULL_TIMEOUT, "image pull limit 30m");
    ctx.run(&cmd).map(drop).map_err(|e| e.to_string())
}

fn start(ctx: &Ctx, s: &Spec, name: &str, volumes: &[String]) -> Result<(), String> {
    let publish = format!("{}:{}", s.fixed_port.unwrap_or(0), s.port);
    let mut cmd = docker(
        ctx.cfg,
        &[
            "run",
            "-d",
            "--name",
            name,
            "--restart",
            "unless-stopped",
            "-p",
            &publish,
        ],
    );
    for label in [
        format!("muvee.domain_prefix={}", s.prefix),
        format!("muvee.expose_port={}", s.port),
        format!("muvee.deployment_id={}", s.deployment_id),
        "muvee.managed=true".to_string(),
    ] {
        cmd = cmd.arg("--label").arg(label);
    }
    if !s.memory.is_empty() {
        cmd = cmd.args(["--memory", s.memory, "--memory-swap", s.memory]);
    }
    for v in volumes {
        cmd = cmd.arg("-v").arg(v);
    }
    // Values never reach argv: `-e NAME` makes the CLI copy NAME from its own environment.
    let mut env_file = String::new();
    for (k, v) in &s.env {
        if cli_reads(k) {
            env_file.push_str(&format!("{k}={v}\n"));
        } else {
            cmd = cmd.arg("-e").arg(k).env(k, v);
        }
    }
    if !env_file.is_empty() {
        cmd = cmd.args(["--env-file", "/dev/stdin"]).stdin(env_file);
    }
    let cmd = cmd.arg(s.image).timeout(RUN_TIMEOUT, "docker run limit 5m");
    ctx.say(&format!("Starting container: {}", cmd.display()));
    ctx.run(&cmd).map(drop).map_err(|e| e.to_string())
}

/// Healthy = running, never restarted, and something answers HTTP on the host port. A TCP
/// connect proves nothing: docker-proxy accepts connections even when the app is not up.
fn wait_healthy(ctx: &Ctx, s: &Spec, name: &str) -> Result<u16, String> {
    let deadline = Instant::now() + ctx.cfg.deploy_health_timeout;
    let mut port = None;
    loop {
        let st = docker_out(
            ctx.cfg,
            &[
                "inspect",
                "--format",
                "{{.State.Status}} {{.RestartCount}} {{.State.ExitCode}}",
                name,
            ],
        )?;
        let f: Vec<&str> = st.split_whitespace().collect();
        let [status, restarts, code] = f[..] else {
            return Err(format!("cannot read the container state: {st:?}"));
        };
        if status != "running" || restarts != "0" {
            return Err(format!(
                "the container is {status} (exit code {code}, restarted {restarts} times)"
            ));
        }
        if port.is_none() {
            let out = docker_out(ctx.cfg, &["port", name, &format!("{}/tcp", s.port)])?;
            port =
                Some(parse_host_port(&out).ok_or_else(|| {
                    format!("cannot read the host port from `docker port`: {out:?}")
                })?);
        }
        if let Some((p, v4)) = port {
            if http_answers(p, v4) {
                return Ok(p);
            }
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "no HTTP answer on host port {} within {} (DEPLOY_HEALTH_TIMEOUT)",
                port.map(|p| p.0).unwrap_or_default(),
                executor::fmt_duration(ctx.cfg.deploy_health_timeout)
            ));
        }
        if signal::cancel_requested() {
            return Err("canceled: agent shutting down".into());
        }
        std::thread::sleep(PROBE_EVERY);
    }
}

/// `docker port` output in any of its formats → (port, bound on IPv4). IPv4 wins.
pub fn parse_host_port(out: &str) -> Option<(u16, bool)> {
    let mut v6 = None;
    for line in out.lines() {
        // `8080/tcp -> 0.0.0.0:32768` (no port argument) or `0.0.0.0:32768`.
        let addr = line.rsplit("-> ").next().unwrap_or(line).trim();
        let Some((host, port)) = addr.rsplit_once(':') else {
            continue;
        };
        let Ok(port) = port.parse::<u16>() else {
            continue;
        };
        if port == 0 {
            continue;
        }
        if host.contains(':') {
            v6.get_or_insert(port);
        } else {
            return Some((port, true));
        }
    }
    v6.map(|p| (p, false))
}

/// True when the port answers an HTTP request with any status line.
fn http_answers(port: u16, v4: bool) -> bool {
    let addr: SocketAddr = if v4 {
        ([127, 0, 0, 1], port).into()
    } else {
        (std::net::Ipv6Addr::LOCALHOST, port).into()
    };
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(3)));
    let mut head = [0u8; 5];
    s.write_all(b"GET / HTTP/1.0\r\nHost: localhost\r\nUser-Agent: muvee-agent\r\n\r\n")
        .is_ok()
        && s.read_exact(&mut head).is_ok()
        && &head == b"HTTP/"
}

fn last_logs(cfg: &Config, name: &str) -> String {
    let cmd =
        docker(cfg, &["logs", "--tail", "20", name]).timeout(DOCKER_SHORT, "docker call timeout");
    match executor::output(&cmd) {
        Ok(o) => o.tail.join("\n"),
        Err(e) => e.output().map(|o| o.tail.join("\n")).unwrap_or_default(),
    }
}

/// Old containers being drained in the background, by app.
static RETIRING: Mutex<Vec<(String, JoinHandle<()>)>> = Mutex::new(Vec::new());

/// Removes `victims` after `drain` on a background thread (the report goes out first), then
/// the mount dirs of deployments they belonged to, then evicts the cache if it is over.
fn retire(cfg: &Config, prefix: &str, keep_dep: &str, victims: Vec<Container>, drain: Duration) {
    let cfg = cfg.clone();
    let mut deps: Vec<String> = victims
        .iter()
        .map(|v| v.deployment_id.clone())
        .filter(|d| !d.is_empty() && d != keep_dep)
        .collect();
    deps.dedup();
    let work = move || {
        let end = Instant::now() + drain;
        while Instant::now() < end && !signal::cancel_requested() {
            std::thread::sleep(Duration::from_millis(100));
        }
        for v in &victims {
            match rm_container(&cfg, &v.name) {
                Ok(()) => log::info!("removed previous container {}", v.name),
                Err(e) => log::warn!("cannot remove previous container {}: {e}", v.name),
            }
        }
        for d in &deps {
            if let Err(e) = datasets::remove_mounts(&cfg.data_dir, d) {
                log::warn!("{e}");
            }
        }
        if let Err(e) = datasets::evict(&cfg, &|l| log::info!("{l}")) {
            log::warn!("dataset cache eviction skipped: {e}");
        }
    };
    let mut list = RETIRING.lock().unwrap_or_else(|e| e.into_inner());
    list.retain(|(_, h)| !h.is_finished());
    match std::thread::Builder::new()
        .name(format!("retire-{prefix}"))
        .spawn(work)
    {
        Ok(h) => list.push((prefix.to_string(), h)),
        Err(e) => log::warn!(
            "cannot start a thread to remove the previous container: {e}; the next deploy or cleanup of {prefix} removes it"
        ),
    }
}

/// Waits for background removals (of one app, or all). run-task and agent shutdown call
/// this so a drained container is not left running.
pub fn wait_retirements(prefix: Option<&str>) {
    let mine: Vec<JoinHandle<()>> = {
        let mut list = RETIRING.lock().unwrap_or_else(|e| e.into_inner());
        let (mine, rest) = std::mem::take(&mut *list)
            .into_iter()
            .partition(|(p, _)| prefix.map_or(true, |x| x == p));
        *list = rest;
        mine.into_iter().map(|(_, h)| h).collect()
    };
    for h in mine {
        let _ = h.join();
    }
}

/// Removes `muvee-<prefix>`, the leftovers of interrupted replacements and the mount dirs
/// of the deployments they ran; containers that do not exist are success.
pub fn remove_app(ctx: &Ctx, prefix: &str) -> Result<(), String> {
    let cfg = ctx.cfg;
    ctx.shared.locks.with(&lock_key(prefix), || {
        let (current, leftovers) = app_containers(cfg, prefix)?;
        // By name too: containers of the Go agent carry no labels.
        rm_container(cfg, &format!("muvee-{prefix}"))?;
        for c in &leftovers {
            rm_container(cfg, &c.name)?;
        }
        for c in current.iter().chain(&leftovers) {
            if !c.deployment_id.is_empty() {
                datasets::remove_mounts(&cfg.data_dir, &c.deployment_id)?;
            }
        }
        Ok(())
    })
}

fn rm_container(cfg: &Config, name: &str) -> Result<(), String> {
    match executor::output(
        &docker(cfg, &["rm", "-f", name]).timeout(DOCKER_SHORT, "docker call timeout"),
    ) {
        Ok(_) => Ok(()),
        Err(e)
            if e.output()
                .is_some_and(|o| o.tail.iter().any(|l| l.contains("No such container"))) =>
        {
            Ok(())
        }
        Err(e) => Err(e.to_string()),
    }
}

fn rename(cfg: &Config, from: &str, to: &str) -> Result<(), String> {
    docker_out(cfg, &["rename", from, to]).map(drop)
}

fn docker(cfg: &Config, args: &[&str]) -> Cmd {
    Cmd::new(&cfg.docker_cli).args(args)
}

/// A short docker call whose stdout we need.
pub fn docker_out(cfg: &Config, args: &[&str]) -> Result<String, String> {
    executor::output(&docker(cfg, args).timeout(DOCKER_SHORT, "docker call timeout"))
        .map(|o| o.stdout)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_in_every_docker_format() {
        assert_eq!(parse_host_port("0.0.0.0:32768\n"), Some((32768, true)));
        assert_eq!(
            parse_host_port("[::]:32769\n0.0.0.0:32768\n"),
            Some((32768, true))
        );
        assert_eq!(parse_host_port(":::32770\n"), Some((32770, false)));
        assert_eq!(parse_host_port("[::]:32771"), Some((32771, false)));
        assert_eq!(
            parse_host_port("8080/tcp -> 0.0.0.0:9000\n8080/tcp -> [::]:9000\n"),
            Some((9000, true))
        );
        assert_eq!(parse_host_port("127.0.0.1:5000\r\n"), Some((5000, true)));
        assert_eq!(parse_host_port(""), None);
        assert_eq!(parse_host_port("Error: No public port '8080/tcp'"), None);
    }

    #[test]
    fn validators() {
        for ok in [
            "registry.example.com/7a7a:1a2b3c",
            "127.0.0.1:5000/muvee-test/busybox:latest",
            "busybox",
            "r/p@sha256:abcdef",
        ] {
            assert!(image_ref(ok), "{ok}");
        }
        for bad in ["", "-v", "--privileged", "a b", "x:", "a//b", "/abs", "a;b"] {
            assert!(!image_ref(bad), "{bad}");
        }
        for ok in ["4g", "512m", "1.5g", "4GB", "4GiB", "1024", "100 m"] {
            assert!(docker_size(ok), "{ok}");
        }
        for bad in ["-1", "4x", "g", "4gg", ""] {
            assert!(!docker_size(bad), "{bad}");
        }
        assert!(container_path("/data/workspace"));
        for bad in ["data", "/a/../b", "/a:b", "/a,b"] {
            assert!(!container_path(bad), "{bad}");
        }
        assert!(env_name("_A1") && env_name("DATABASE_URL"));
        for bad in ["", "1A", "A-B", "A=B", "A B"] {
            assert!(!env_name(bad), "{bad}");
        }
        assert!(cli_reads("DOCKER_HOST") && cli_reads("LD_PRELOAD") && cli_reads("https_proxy"));
        assert!(!cli_reads("DATABASE_URL"));
    }
}
