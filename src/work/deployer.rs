//! Deploy role: runs an app image as `muvee-<domain_prefix>` and reports its host port.
//!
//! Unlike the Go agent (which removes the running container first, W-12), a replacement
//! never interrupts the app: the old container is renamed aside and keeps serving until
//! the new one answers HTTP; on any failure the new one is removed and the old one renamed
//! back. The old one is removed in the background, DEPLOY_DRAIN after the control plane
//! accepted the deploy's completed report: it switches Traefik to the new port only then.

use crate::config::Config;
use crate::sys::docker::{Docker, PsRow, RunSpec};
use crate::sys::executor::fmt_duration;
use crate::sys::wait::{self, Stop};
use crate::task::{valid_id, Payload};
use crate::work::ctx::{Ctx, Release, Shared};
use crate::work::datasets;
use crate::work::error::TaskError;
use crate::work::spec::DeploySpec;
use crate::work::{cleanups, workspace};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long an old container waits for its replacement's report to be accepted before it
/// is removed anyway (the outbox parks a report refused for 2 h; this is beyond any outage
/// it rides out with the app reachable).
const UNDELIVERED_MAX: Duration = Duration::from_secs(6 * 3600);

/// Health probes start 20 ms apart and double up to 250 ms: an app that is up at once is
/// noticed at once, a slow one costs a probe (and a `docker inspect`) four times a second.
fn probe_delays() -> impl Iterator<Item = Duration> {
    let next = |d: &Duration| Some((*d * 2).min(Duration::from_millis(250)));
    std::iter::successors(Some(Duration::from_millis(20)), next)
}

/// `deploy`: replaces the app's container; returns the new host port. The slow parts (the
/// pull, up to 30 min; the dataset sync, up to 6 h) come first, outside the app's lock: the
/// app's restarts, pauses and cleanups wait only for the replacement itself.
pub fn deploy(ctx: &Ctx) -> Result<u16, TaskError> {
    let p = Payload::of(&ctx.task.payload)?;
    let spec = DeploySpec::parse(ctx, &p)?;
    let key = lock_key(spec.prefix);
    let r =
        prepare(ctx, &spec).and_then(|mounts| ctx.exclusive(&key, || replace(ctx, &spec, &mounts)));
    if r.is_err() {
        let _ = ctx.exclusive(&key, || {
            forget_mounts(ctx, &spec);
            Ok(())
        });
    }
    r
}

/// What a deploy needs before it touches the app: the image, and the datasets synced and
/// linked (pinned until the returned mounts are dropped).
fn prepare<'a>(ctx: &'a Ctx, s: &DeploySpec) -> Result<datasets::Mounts<'a>, TaskError> {
    ensure_image(ctx, s.image)?;
    datasets::setup(ctx, s.deployment_id, &s.datasets)
}

/// The lock every task that changes an app's containers holds.
pub fn lock_key(prefix: &str) -> String {
    format!("deploy:{prefix}")
}

/// The app's current container and the leftovers of interrupted replacements.
fn app_containers(docker: &Docker, prefix: &str) -> Result<(Option<PsRow>, Vec<PsRow>), TaskError> {
    let main = format!("muvee-{prefix}");
    let (mut current, mut leftovers) = (None, Vec::new());
    for c in docker.ps(true, &main)? {
        if c.name == main {
            current = Some(c);
        } else if is_aside_of(&c, prefix) {
            leftovers.push(c);
        }
    }
    Ok((current, leftovers))
}

/// The name a replacement gives the container it sets aside.
fn aside_name(prefix: &str, id: &str) -> String {
    format!("muvee-{prefix}-old-{}", &id[..id.len().min(12)])
}

/// A leftover of our own replacement of `prefix`: labelled with it, or (a container of the
/// Go agent, which labels nothing, that we set aside) named exactly as we name it. Another
/// app may well be called `<prefix>-old-v2`.
pub fn is_aside_of(c: &PsRow, prefix: &str) -> bool {
    let ours = format!("muvee-{prefix}-old-");
    match c.domain_prefix.as_str() {
        "" => c.name == aside_name(prefix, &c.id),
        label => label == prefix && c.name.starts_with(&ours),
    }
}

/// After a failed deploy: this deployment's mount dir goes, unless the container that keeps
/// running uses it.
fn forget_mounts(ctx: &Ctx, s: &DeploySpec) {
    let (current, _) = app_containers(&ctx.docker(), s.prefix).unwrap_or_default();
    if current.map_or(true, |c| c.deployment_id != s.deployment_id) {
        let _ = datasets::remove_mounts(&ctx.cfg.data_dir, s.deployment_id);
    }
}

/// The container being replaced, renamed aside, and whether we stopped it.
struct Old {
    c: PsRow,
    stopped: bool,
}

/// The replacement, under the app's lock.
fn replace(ctx: &Ctx, s: &DeploySpec, mounts: &datasets::Mounts) -> Result<u16, TaskError> {
    // A previous deploy of this app may still be draining its old container.
    stop_awaiting(ctx.shared, s.prefix);
    ctx.shared.retiring.wait(Some(s.prefix));
    // The app is wanted here again: a cleanup that never finished must not reap it.
    cleanups::end(&ctx.cfg.data_dir, s.prefix).map_err(TaskError::io("DATA_DIR/state/cleanups"))?;
    let mut volumes = mounts.volumes.clone();
    if let Some((dir, path)) = &s.workspace {
        let dir = workspace::prepare(ctx, dir, s.image)?;
        volumes.push(format!("{}:{path}:rw", dir.display()));
    }
    let name = format!("muvee-{}", s.prefix);
    let (old, leftovers) = set_aside(ctx, s, &name)?;
    let started = start(ctx, s, &name, volumes).and_then(|()| wait_healthy(ctx, &name, s.port));
    match started {
        Ok(port) => {
            ctx.say(&format!(
                "Container {name} is healthy, listening on host port {port}."
            ));
            retire_old(ctx, s, old, leftovers);
            Ok(port)
        }
        Err(reason) => Err(roll_back(ctx, s, &name, old.as_ref(), reason)),
    }
}

/// Renames the current container aside (it keeps serving) and stops it only when it holds
/// the fixed host port. Returns it and the leftovers of interrupted replacements.
fn set_aside(
    ctx: &Ctx,
    s: &DeploySpec,
    name: &str,
) -> Result<(Option<Old>, Vec<PsRow>), TaskError> {
    let docker = ctx.docker();
    let (current, mut leftovers) = app_containers(&docker, s.prefix)?;
    let old = match current {
        Some(c) => {
            let aside = aside_name(s.prefix, &c.id);
            ctx.say(&format!(
                "Renaming the current container to {aside}; it keeps serving until the new one is healthy"
            ));
            docker.rename(name, &aside)?;
            Some(PsRow { name: aside, ..c })
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
    let Some(c) = old else {
        return Ok((None, leftovers));
    };
    // A fixed host port cannot be bound twice: the old container has to let go first.
    let holds_fixed = |o: &PsRow| {
        let ports = docker.ports(&o.name, None).unwrap_or_default();
        ports.iter().any(|p| Some(p.0) == s.fixed_port)
    };
    let stopped = match s.fixed_port {
        Some(fixed) if c.running && holds_fixed(&c) => {
            ctx.say(&format!(
                "Stopping {} to free fixed host port {fixed}",
                c.name
            ));
            if let Err(e) = docker.stop(&c.name) {
                let _ = docker.rename(&c.name, name);
                return Err(TaskError::from(e).context("cannot stop the current container"));
            }
            true
        }
        _ => false,
    };
    Ok((Some(Old { c, stopped }), leftovers))
}

/// After a healthy start: the old container drains for DEPLOY_DRAIN (if it still served),
/// then it and the leftovers are removed in the background. A running leftover may be what
/// the control plane still routes to (a previous deploy's report never got through, and this
/// deploy took over its retirement): it drains too.
fn retire_old(ctx: &Ctx, s: &DeploySpec, old: Option<Old>, leftovers: Vec<PsRow>) {
    let serving = old.as_ref().is_some_and(|o| o.c.running && !o.stopped)
        || leftovers.iter().any(|c| c.running);
    let mut victims = leftovers;
    victims.extend(old.map(|o| o.c));
    if victims.is_empty() {
        return;
    }
    let drain = if serving {
        ctx.cfg.deploy_drain
    } else {
        Duration::ZERO
    };
    if !drain.is_zero() {
        ctx.say(&format!(
            "The previous container is removed {} (DEPLOY_DRAIN) after the control plane has taken this deploy's report.",
            fmt_duration(drain)
        ));
    }
    let awaited = (drain > Duration::ZERO && ctx.shared.deliveries.expect(&ctx.task.id, s.prefix))
        .then(|| ctx.task.id.clone());
    retire(ctx.cfg, ctx.shared, s, victims, awaited, drain);
}

/// A newer deploy or a cleanup of `prefix` takes over: its retirements still waiting for a
/// report end without removing anything (the control plane may still route to what they
/// would remove); the newer deploy finds those containers set aside and retires them once
/// its own report is taken, a cleanup removes them.
fn stop_awaiting(shared: &Shared, prefix: &str) {
    if shared
        .deliveries
        .release(|_, p| p == prefix, Release::Superseded)
    {
        shared.bell.ring();
    }
}

/// Waits until the deploy's final report was accepted (the control plane routes to the new
/// port only then), at most UNDELIVERED_MAX. False: keep the old containers, because the
/// agent stops before the report went out or a newer deploy or a cleanup took over (the
/// next deploy or cleanup of the app, or the reaper once the new container runs, removes
/// them).
fn wait_delivered(shared: &Shared, task: &str, prefix: &str) -> bool {
    let cap = Instant::now() + UNDELIVERED_MAX;
    let deliveries = &shared.deliveries;
    wait::until(&shared.bell, Some(cap), Stop::Shutdown, || {
        deliveries.released(task)
    });
    match deliveries.forget(task) {
        Some(Release::Delivered) => return true,
        Some(Release::Superseded) => {
            log::info!("a newer deploy or a cleanup of {prefix} takes over the previous containers (task {task}'s report was not taken yet)");
            return false;
        }
        None => {}
    }
    if Stop::Shutdown.requested() {
        log::info!("keeping the previous container of {prefix}: the control plane has not taken the report of task {task} yet");
        return false;
    }
    log::warn!(
        "the report of task {task} was not accepted within {}; removing the previous container of {prefix} anyway",
        fmt_duration(UNDELIVERED_MAX)
    );
    true
}

/// Removes the failed new container and puts the old one back; the error says what
/// happened to each. A cancel stays a cancel once the old container is back.
fn roll_back(
    ctx: &Ctx,
    s: &DeploySpec,
    name: &str,
    old: Option<&Old>,
    reason: TaskError,
) -> TaskError {
    let logs = ctx.docker().logs_tail(name, 20);
    let mut msg = format!("deploy failed: {reason}");
    let (removed, restored) = undo(ctx, s, name, old);
    if let Err(e) = removed {
        msg.push_str(&format!("; could not remove the new container: {e}"));
    }
    match (old, restored) {
        (Some(o), Some(Ok(()))) if o.c.running => {
            msg.push_str("; the previous container keeps serving")
        }
        (Some(_), Some(Ok(()))) => {
            msg.push_str(&format!("; the previous container is back as {name}"))
        }
        (Some(o), Some(Err(e))) => msg.push_str(&format!(
            "; could not restore the previous container {}: {e}",
            o.c.name
        )),
        _ => {}
    }
    if reason.is_canceled() {
        return TaskError::Canceled;
    }
    if !logs.is_empty() {
        msg.push_str(&format!("\nlast log lines of the new container:\n{logs}"));
    }
    TaskError::Failed(msg)
}

/// How long a rollback the engine refuses is tried again, under the app's lock: until it
/// is done, the failed container holds the app's name, and statuses (which skip an app
/// whose lock is held) would route the control plane to it.
const ROLLBACK_RETRY: Duration = Duration::from_secs(60);

/// How the removal of the new container and the restore of the old one (None: there is
/// none) ended.
type Undone = (Result<(), TaskError>, Option<Result<(), TaskError>>);

/// Removes the new container, then puts the old one back; each step is tried again while
/// the engine refuses, for ROLLBACK_RETRY (a cancel stops trying).
fn undo(ctx: &Ctx, s: &DeploySpec, name: &str, old: Option<&Old>) -> Undone {
    let docker = ctx.docker();
    let until = Instant::now() + ROLLBACK_RETRY;
    let next = |d: &Duration| Some((*d * 2).min(Duration::from_secs(8)));
    let mut delays = std::iter::successors(Some(Duration::from_millis(500)), next);
    let remove = || docker.remove(name).map_err(TaskError::from);
    let mut removed = remove();
    let (mut restored, mut renamed) = (None, false);
    loop {
        // The old one gets the name back only once the new one has let go of it.
        if let (Ok(()), Some(o)) = (&removed, old) {
            if !matches!(restored, Some(Ok(()))) {
                restored = Some(restore(ctx, s, name, o, &mut renamed));
            }
        }
        let done = removed.is_ok() && old.map_or(true, |_| matches!(restored, Some(Ok(()))));
        let pause = Instant::now() + delays.next().unwrap_or_default();
        if done || pause > until || wait::pause(&ctx.shared.bell, pause, Stop::Cancel) {
            break;
        }
        if removed.is_err() {
            removed = remove();
        }
    }
    if let (Err(e), Some(_), None) = (&removed, old, &restored) {
        restored = Some(Err(TaskError::Failed(format!(
            "the new container still holds the name: {e}"
        ))));
    }
    (removed, restored)
}

/// Renames the old container back (unless `renamed` says an earlier try did: a retry only
/// restarts it), restarting it if we stopped it; reports only once the restored app serves
/// again (best effort).
fn restore(
    ctx: &Ctx,
    s: &DeploySpec,
    name: &str,
    o: &Old,
    renamed: &mut bool,
) -> Result<(), TaskError> {
    let docker = ctx.docker();
    if !*renamed {
        docker.rename(&o.c.name, name)?;
        *renamed = true;
    }
    if o.stopped {
        docker.start(name)?;
        let until = Instant::now() + ctx.cfg.deploy_health_timeout;
        let port = s.fixed_port.unwrap_or_default();
        let mut delays = probe_delays();
        // A cancel cuts the wait short: the app is restarted, only its first answer is not awaited.
        while !http_answers(port, true) && Instant::now() < until {
            let pause = Instant::now() + delays.next().unwrap_or_default();
            if wait::pause(&ctx.shared.bell, pause, Stop::Cancel) {
                break;
            }
        }
    }
    Ok(())
}

/// Pulls the image unless it is present, so a bad tag fails before anything is touched.
fn ensure_image(ctx: &Ctx, image: &str) -> Result<(), TaskError> {
    let docker = ctx.docker();
    if let Ok(true) = docker.image_present(image) {
        return Ok(());
    }
    ctx.say(&format!("Pulling {image}..."));
    Ok(docker.pull(image, &mut |l| (ctx.out)(l))?)
}

fn start(ctx: &Ctx, s: &DeploySpec, name: &str, volumes: Vec<String>) -> Result<(), TaskError> {
    let labels = vec![
        format!("muvee.domain_prefix={}", s.prefix),
        format!("muvee.expose_port={}", s.port),
        format!("muvee.deployment_id={}", s.deployment_id),
        "muvee.managed=true".to_string(),
        // The reaper only ever removes containers of its own node.
        format!("muvee.node={}", ctx.cfg.node_name),
    ];
    let spec = RunSpec {
        name,
        image: s.image,
        publish: format!("{}:{}", s.fixed_port.unwrap_or(0), s.port),
        labels,
        memory: s.memory,
        volumes,
        env: &s.env,
    };
    let docker = ctx.docker();
    let cmd = docker.run_cmd(&spec);
    ctx.say(&format!("Starting container: {}", cmd.display()));
    Ok(docker.run(&cmd, &mut |l| (ctx.out)(l))?)
}

/// Healthy = running, never restarted, and something answers HTTP on the host port. A TCP
/// connect proves nothing: docker-proxy accepts connections even when the app is not up.
pub(crate) fn wait_healthy(ctx: &Ctx, name: &str, container_port: u16) -> Result<u16, TaskError> {
    let docker = ctx.docker();
    let deadline = Instant::now() + ctx.cfg.deploy_health_timeout;
    let mut delays = probe_delays();
    loop {
        let (st, (p, v4)) = docker.health(name, container_port)?;
        if st.status != "running" || st.restarts != 0 {
            return Err(TaskError::Failed(format!(
                "the container is {} (exit code {}, restarted {} times)",
                st.status, st.exit_code, st.restarts
            )));
        }
        if http_answers(p, v4) {
            return Ok(p);
        }
        if Instant::now() >= deadline {
            return Err(TaskError::Failed(format!(
                "no HTTP answer on host port {p} within {} (DEPLOY_HEALTH_TIMEOUT)",
                fmt_duration(ctx.cfg.deploy_health_timeout)
            )));
        }
        let pause = Instant::now() + delays.next().unwrap_or_default();
        if wait::pause(&ctx.shared.bell, pause, Stop::Cancel) {
            return Err(TaskError::Canceled);
        }
    }
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

/// Removes `victims` on a background thread, `drain` after the task `awaited`'s report was
/// accepted (nothing awaited: `drain` from now), then the mount dirs of deployments they
/// belonged to, then evicts the cache if it is over.
fn retire(
    cfg: &Config,
    shared: &Arc<Shared>,
    s: &DeploySpec,
    victims: Vec<PsRow>,
    awaited: Option<String>,
    drain: Duration,
) {
    let jobs = shared.clone();
    let (cfg, shared) = (cfg.clone(), shared.clone());
    let mut deps: Vec<String> = victims
        .iter()
        .map(|v| v.deployment_id.clone())
        .filter(|d| !d.is_empty() && d != s.deployment_id)
        .collect();
    deps.dedup();
    let (app, task) = (s.prefix.to_string(), awaited.clone());
    let work = move || {
        if let Some(task) = &task {
            if !wait_delivered(&shared, task, &app) {
                return;
            }
        }
        let end = Instant::now() + drain;
        wait::pause(&shared.bell, end, Stop::Cancel);
        let docker = shared.docker(&cfg);
        for v in &victims {
            match docker.remove(&v.name) {
                Ok(()) => log::info!("removed previous container {}", v.name),
                Err(e) => log::warn!("cannot remove previous container {}: {e}", v.name),
            }
        }
        for d in &deps {
            if let Err(e) = datasets::remove_mounts(&cfg.data_dir, d) {
                log::warn!("{e}");
            }
        }
        if let Err(e) = datasets::evict(&cfg, &shared, &|l| log::info!("{l}")) {
            log::warn!("dataset cache eviction skipped: {e}");
        }
    };
    let prefix = s.prefix;
    if let Err(e) = jobs
        .retiring
        .spawn(prefix, format!("retire-{prefix}"), work)
    {
        if let Some(t) = &awaited {
            jobs.deliveries.forget(t);
        }
        log::warn!(
            "cannot start a thread to remove the previous container: {e}; the next deploy or cleanup of {prefix} removes it"
        );
    }
}

/// At start, before any status report: a deploy the previous agent process died in (it is
/// reported failed) may have left its new container running next to the old one set aside;
/// a status report would then route the app to the failed version. Its container goes and
/// the old one gets its name back, and its mount dir goes. `deployments` are the
/// interrupted deploys' ids.
pub fn reconcile(shared: &Shared, cfg: &Config, deployments: &[String]) {
    let docker = shared.docker(cfg);
    for dep in deployments.iter().filter(|d| valid_id(d)) {
        let Ok(rows) = docker.ps_labelled("muvee.deployment_id", dep) else {
            continue;
        };
        for c in rows {
            let main = format!("muvee-{}", c.domain_prefix);
            if c.domain_prefix.is_empty() || c.name != main {
                continue;
            }
            log::warn!("removing {main} of the interrupted deployment {dep}");
            if let Err(e) = docker.remove(&main) {
                log::error!("cannot remove {main} of the interrupted deployment {dep}: {e}");
                continue;
            }
            restore_aside(&docker, &c.domain_prefix);
        }
        // Its mount dir: no container of the failed deployment is left to use it.
        if docker
            .ps_labelled("muvee.deployment_id", dep)
            .is_ok_and(|r| r.is_empty())
        {
            if let Err(e) = datasets::remove_mounts(&cfg.data_dir, dep) {
                log::warn!("{e}");
            }
        }
    }
}

/// Gives an app's old container, set aside by an interrupted replacement, its name back.
fn restore_aside(docker: &Docker, prefix: &str) {
    let Ok((None, leftovers)) = app_containers(docker, prefix) else {
        return;
    };
    if let Some(old) = leftovers.iter().find(|c| c.running) {
        let main = format!("muvee-{prefix}");
        match docker.rename(&old.name, &main) {
            Ok(()) => log::info!("{} is back as {main}", old.name),
            Err(e) => log::error!("cannot rename {} back to {main}: {e}", old.name),
        }
    }
}

/// Removes `muvee-<prefix>`, the leftovers of interrupted replacements and the mount dirs
/// of the deployments they ran; containers that do not exist are success.
pub fn remove_app(ctx: &Ctx, prefix: &str) -> Result<(), TaskError> {
    let docker = ctx.docker();
    stop_awaiting(ctx.shared, prefix);
    ctx.exclusive(&lock_key(prefix), || {
        // Marked once its turn comes: queued behind a deploy of the app, the mark would
        // let the reaper take the app's containers during that deploy.
        cleanups::begin(&ctx.cfg.data_dir, prefix)
            .map_err(TaskError::io("DATA_DIR/state/cleanups"))?;
        let (current, leftovers) = app_containers(&docker, prefix)?;
        // By name too: containers of the Go agent carry no labels.
        docker.remove(&format!("muvee-{prefix}"))?;
        for c in &leftovers {
            docker.remove(&c.name)?;
        }
        for c in current.iter().chain(&leftovers) {
            if !c.deployment_id.is_empty() {
                datasets::remove_mounts(&ctx.cfg.data_dir, &c.deployment_id)?;
            }
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::fake::Reply;
    use crate::work::ctx::testing::Harness;
    use crate::work::dispatch;
    use serde_json::json;
    use std::net::TcpListener;

    const ROW: &str = "abcdef1234567890\tmuvee-app\trunning\tapp\tdep-0\t8080";
    const ASIDE: &str = "muvee-app-old-abcdef123456";

    /// A port that answers HTTP, like a healthy app behind docker-proxy.
    fn http_port() -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for mut s in l.incoming().flatten() {
                let mut buf = [0u8; 512];
                let _ = s.read(&mut buf);
                let _ = s.write_all(b"HTTP/1.0 200 OK\r\n\r\nok");
            }
        });
        port
    }

    /// `docker inspect` of a running container publishing 8080/tcp on `port`.
    fn running_on(port: u16) -> String {
        format!(r#"running 0 0 false {{"8080/tcp":[{{"HostIp":"0.0.0.0","HostPort":"{port}"}}]}}"#)
    }

    /// A node where `muvee-app` runs and every docker call succeeds.
    fn node(name: &str, app_port: u16) -> Harness {
        let h = Harness::new(
            name,
            &[("NODE_ROLE", "deploy"), ("DEPLOY_HEALTH_TIMEOUT", "1s")],
        );
        let f = &h.fake;
        f.on("docker image inspect", Reply::Ok("sha256:1".into()));
        f.on(
            "docker ps -a --filter name=muvee-app",
            Reply::Ok(ROW.into()),
        );
        f.on("docker inspect --format", Reply::Ok(running_on(app_port)));
        f.on("docker logs", Reply::Ok("app log line".into()));
        h
    }

    fn deploy_with(h: &Harness, extra: serde_json::Value) -> Result<u16, TaskError> {
        let mut p = json!({"image_tag": "r/app:1", "domain_prefix": "app",
                           "deployment_id": "dep-1", "container_port": 8080});
        if let (Some(p), Some(extra)) = (p.as_object_mut(), extra.as_object()) {
            p.extend(extra.clone());
        }
        let r = h.with("deploy", p, deploy);
        h.shared.retiring.wait(None);
        r
    }

    fn text(r: &Result<u16, TaskError>) -> String {
        match r {
            Ok(p) => format!("ok {p}"),
            Err(e) => dispatch::report(e).result.unwrap_or_default(),
        }
    }

    /// The index of the first call starting with `prefix` (panics when it never ran).
    fn at(h: &Harness, prefix: &str) -> usize {
        let calls = h.fake.calls();
        calls
            .iter()
            .position(|c| c.starts_with(prefix))
            .unwrap_or_else(|| panic!("{prefix:?} never ran: {calls:#?}"))
    }

    #[test]
    fn health_probes_start_at_20ms_and_back_off_to_250ms() {
        let ms: Vec<u128> = probe_delays().take(7).map(|d| d.as_millis()).collect();
        assert_eq!(ms, [20, 40, 80, 160, 250, 250, 250]);
    }

    #[test]
    fn a_healthy_replacement_retires_the_old_container_after_the_new_one_answers() {
        let h = node("dep-ok", http_port());
        let r = deploy_with(&h, json!({}));
        assert!(r.is_ok(), "{}", text(&r));
        let order = [
            "docker rename muvee-app muvee-app-old-abcdef123456",
            "docker run -d --name muvee-app",
            "docker inspect --format",
            &format!("docker rm -f {ASIDE}"),
        ];
        let idx: Vec<usize> = order.iter().map(|c| at(&h, c)).collect();
        assert!(idx.windows(2).all(|w| w[0] < w[1]), "{:#?}", h.fake.calls());
        assert!(h.said().contains("is healthy, listening on host port"));
    }

    #[test]
    fn each_failed_step_of_a_replacement_puts_the_old_container_back() {
        let closed = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        // (step, rule prefix, reply, expected report text, whether the new container ran)
        let cases: Vec<(&str, &str, Reply, &str, bool)> = vec![
            ("pull", "docker pull", Reply::Fail(1, "pull access denied".into()),
             "docker pull exited 1: pull access denied", false),
            ("rename aside", "docker rename muvee-app ", Reply::Fail(1, "conflict".into()),
             "docker rename exited 1: conflict", false),
            ("run", "docker run", Reply::Fail(125, "bad flag".into()),
             "deploy failed: docker run exited 125: bad flag; the previous container keeps serving", true),
            ("health", "docker inspect --format", Reply::Ok("restarting 1 3 false".into()),
             "deploy failed: the container is restarting (exit code 3, restarted 1 times); the previous container keeps serving\nlast log lines of the new container:\napp log line", true),
            ("port", "docker inspect --format", Reply::Ok("running 0 0 false {}".into()),
             "deploy failed: cannot read the host port of 8080/tcp from `docker inspect`: \"{}\"", true),
            ("http", "docker inspect --format", Reply::Ok(running_on(closed)),
             &*format!("deploy failed: no HTTP answer on host port {closed} within 1s (DEPLOY_HEALTH_TIMEOUT)").leak(), true),
        ];
        for (step, prefix, reply, expect, ran) in cases {
            let h = node(&format!("dep-fail-{}", step.replace(' ', "-")), http_port());
            if step == "pull" {
                h.fake.on(
                    "docker image inspect",
                    Reply::Fail(1, "Error: No such image: r/app:1".into()),
                );
            }
            h.fake.on(prefix, reply);
            let r = deploy_with(&h, json!({}));
            let why = text(&r);
            assert!(why.starts_with(expect), "{step}: {why}");
            assert_eq!(
                !h.fake.ran("docker run").is_empty(),
                ran,
                "{step}: {:#?}",
                h.fake.calls()
            );
            if ran {
                // The new container goes, the old one gets its name back, in that order.
                assert!(
                    at(&h, "docker rm -f muvee-app")
                        < at(&h, &format!("docker rename {ASIDE} muvee-app")),
                    "{step}"
                );
            }
            assert!(
                h.fake.ran(&format!("docker rm -f {ASIDE}")).is_empty(),
                "{step}: old one removed"
            );
        }
    }

    /// Campaign seed 1202: the engine failing during a rollback left the failed container
    /// with the app's name (and statuses routed to it). The rollback is tried again.
    #[test]
    fn a_rollback_the_engine_refuses_is_tried_again_until_the_old_container_is_back() {
        let h = node("dep-undo", http_port());
        h.fake.on(
            "docker inspect --format",
            Reply::Ok("restarting 1 3 false".into()),
        );
        let refused = Reply::Fail(1, "Error response from daemon: busy".into());
        h.fake.once("docker rm -f muvee-app", refused.clone());
        h.fake.once("docker rm -f muvee-app", refused.clone());
        h.fake
            .once(&format!("docker rename {ASIDE} muvee-app"), refused);
        let r = deploy_with(&h, json!({}));
        let why = text(&r);
        assert!(
            why.contains("; the previous container keeps serving"),
            "{why}"
        );
        assert_eq!(h.fake.ran("docker rm -f muvee-app").len(), 3);
        assert_eq!(
            h.fake
                .ran(&format!("docker rename {ASIDE} muvee-app"))
                .len(),
            2
        );
    }

    #[test]
    fn a_cancel_during_the_run_rolls_back_and_reports_canceled() {
        let h = node("dep-cancel", http_port());
        h.fake.on("docker run", Reply::Canceled);
        let r = deploy_with(&h, json!({}));
        assert!(matches!(r, Err(TaskError::Canceled)), "{}", text(&r));
        assert_eq!(text(&r), "canceled: agent shutting down");
        at(&h, &format!("docker rename {ASIDE} muvee-app"));
    }

    #[test]
    fn a_failed_retire_does_not_fail_a_healthy_deploy() {
        let port = http_port();
        let h = node("dep-retire", port);
        h.fake.on(
            &format!("docker rm -f {ASIDE}"),
            Reply::Fail(1, "device busy".into()),
        );
        assert_eq!(deploy_with(&h, json!({})).unwrap(), port);
        at(&h, &format!("docker rm -f {ASIDE}"));
    }

    #[test]
    fn a_fixed_port_is_freed_first_and_restored_after_a_failure() {
        let fixed = http_port();
        let h = node("dep-fixed", fixed);
        let fixed_out = format!("8080/tcp -> 0.0.0.0:{fixed}");
        h.fake
            .on(&format!("docker port {ASIDE}"), Reply::Ok(fixed_out));
        h.fake.on(
            "docker run",
            Reply::Fail(125, "port is already allocated".into()),
        );
        let r = deploy_with(&h, json!({"fixed_host_port": fixed}));
        assert!(
            text(&r).contains("the previous container keeps serving"),
            "{}",
            text(&r)
        );
        let stop = at(&h, &format!("docker stop -t 10 {ASIDE}"));
        assert!(stop < at(&h, "docker run"));
        assert!(
            at(&h, &format!("docker rename {ASIDE} muvee-app")) < at(&h, "docker start muvee-app")
        );

        // The old one cannot be stopped: nothing new runs and it gets its name back.
        let h = node("dep-fixed-stop", fixed);
        h.fake.on(
            &format!("docker port {ASIDE}"),
            Reply::Ok(format!("0.0.0.0:{fixed}")),
        );
        h.fake.on("docker stop", Reply::Fail(1, "timeout".into()));
        let r = deploy_with(&h, json!({"fixed_host_port": fixed}));
        assert_eq!(
            text(&r),
            "cannot stop the current container: docker stop exited 1: timeout"
        );
        assert!(h.fake.ran("docker run").is_empty());
        at(&h, &format!("docker rename {ASIDE} muvee-app"));
    }

    #[test]
    fn only_our_labels_or_exact_aside_names_make_a_leftover() {
        let row = |name: &str, label: &str| PsRow {
            id: "abcdef123456".into(),
            name: name.into(),
            domain_prefix: label.into(),
            ..PsRow::default()
        };
        assert!(is_aside_of(&row("muvee-api-old-abcdef123456", ""), "api"));
        assert!(is_aside_of(&row("muvee-api-old-0123", "api"), "api"));
        // The Go agent's app `api-old-v2`, and another app's labelled container.
        assert!(!is_aside_of(&row("muvee-api-old-v2", ""), "api"));
        assert!(!is_aside_of(&row("muvee-api-old-v2", "api-old-v2"), "api"));
    }

    #[test]
    fn an_app_left_aside_by_an_interrupted_deploy_is_the_rollback_target() {
        let h = node("dep-aside", http_port());
        let row = format!("abcdef1234567890\t{ASIDE}\trunning\tapp\tdep-0\t8080");
        h.fake
            .on("docker ps -a --filter name=muvee-app", Reply::Ok(row));
        h.fake.on("docker run", Reply::Fail(125, "no".into()));
        let r = deploy_with(&h, json!({}));
        assert!(
            text(&r).contains("the previous container keeps serving"),
            "{}",
            text(&r)
        );
        assert!(h.fake.ran("docker rename muvee-app ").is_empty());
        at(&h, &format!("docker rename {ASIDE} muvee-app"));
    }
}
