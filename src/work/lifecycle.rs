//! Deploy role: the inspection and lifecycle tasks of today's control plane (protocol §2.5):
//! `runtime_logs`, `restart`, `env`, `describe`, `pause` and `unpause`, each with the payload
//! `{"domain_prefix": ...}` (`runtime_logs` adds `tail` and `since`). Their output is the
//! report's `result`; `dispatch` sends it through the same sanitising as every report.
//!
//! The app's container is ours by label (`muvee.domain_prefix`), else the exact name the Go
//! agent uses, `muvee-<prefix>`. Tasks that change the container (restart, pause, unpause)
//! take the app's deploy lock, so they never interleave with a replacement or a cleanup.

use crate::config::Config;
use crate::sys::docker::{Docker, DockerError, PsRow};
use crate::task::{go_escape, Payload};
use crate::work::ctx::Ctx;
use crate::work::deployer::{self, is_aside_of};
use crate::work::error::TaskError;
use crate::work::spec;
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

/// The most log text a `runtime_logs` result carries (today's agent: 1 MiB).
pub const LOG_CAP: usize = 1 << 20;
/// Appended when the log was cut at [`LOG_CAP`], as today's agent does.
pub const TRUNCATED: &str = "\n[truncated]\n";

/// `runtime_logs` {domain_prefix, tail?, since?}: `docker logs` (stdout and stderr), at most
/// 1 MiB. A missing container is success with what docker said, as in today's agent.
pub fn runtime_logs(ctx: &Ctx) -> Result<String, TaskError> {
    let p = Payload::of(&ctx.task.payload)?;
    let prefix = spec::domain_prefix(&p)?;
    let tail = p.uint("tail")?.filter(|n| *n > 0);
    let since = since(&p)?;
    let docker = ctx.docker();
    let name = resolve(&docker, prefix)?;
    match docker.logs(&name, tail, since, LOG_CAP) {
        Ok(logs) if logs.truncated => Ok(logs.text + TRUNCATED),
        Ok(logs) => Ok(logs.text),
        Err(e @ DockerError::NotFound(_)) => Ok(e.printed() + "\n"),
        Err(e) => Err(e.into()),
    }
}

/// `since`: what `docker logs --since` takes (`10m`, `2026-11-02T08:15:30Z`, a unix time),
/// kept to the characters those use so nothing else reaches argv.
fn since<'a>(p: &Payload<'a>) -> Result<Option<&'a str>, TaskError> {
    let v = p.str("since")?.trim();
    if v.is_empty() {
        return Ok(None);
    }
    let ok = v.len() <= 64
        && !v.starts_with('-')
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".:+-".contains(&b));
    if !ok {
        return Err(TaskError::Invalid(format!(
            "payload field `since`: {v:?} is not a time like 10m, 1h30m or 2026-11-02T08:15:30Z"
        )));
    }
    Ok(Some(v))
}

/// `restart` {domain_prefix}: `docker restart`; its output, else `<name> restarted`. A
/// missing container is success with what docker said, as in today's agent.
pub fn restart(ctx: &Ctx) -> Result<String, TaskError> {
    let (docker, prefix) = (ctx.docker(), prefix(ctx)?);
    ctx.exclusive(&deployer::lock_key(prefix), || {
        let name = resolve(&docker, prefix)?;
        match docker.restart(&name) {
            Ok(out) => Ok(or_else(&out, || format!("{name} restarted"))),
            Err(e @ DockerError::NotFound(_)) => Ok(e.printed().trim().to_string()),
            Err(e) => Err(e.into()),
        }
    })
}

/// `env` {domain_prefix}: the container's environment as a JSON object with sorted keys,
/// values as the container has them (only the agent's own secrets are masked), compact and
/// escaped like Go's `json.Marshal`.
pub fn env(ctx: &Ctx) -> Result<String, TaskError> {
    let (docker, prefix) = (ctx.docker(), prefix(ctx)?);
    let name = resolve(&docker, prefix)?;
    let env = docker.container_env(&name).map_err(missing(prefix))?;
    Ok(env_json(&env))
}

/// `NAME=value` entries → `{"NAME":"value"}`; a later entry wins, as in the process.
pub fn env_json(env: &[String]) -> String {
    let map: BTreeMap<&str, &str> = env
        .iter()
        .map(|e| e.split_once('=').unwrap_or((e, "")))
        .collect();
    go_escape(&serde_json::to_string(&map).unwrap_or_default())
}

/// `describe` {domain_prefix}: the §2.5 summary of `docker inspect`, 2-space indented.
pub fn describe(ctx: &Ctx) -> Result<String, TaskError> {
    let (docker, prefix) = (ctx.docker(), prefix(ctx)?);
    let name = resolve(&docker, prefix)?;
    let doc = docker.inspect(&name).map_err(missing(prefix))?;
    Ok(describe_doc(&doc))
}

/// `pause` {domain_prefix}: stops every container of the app (our label, its compose
/// project, the exact Go name). Docker's output (the ids), else `stopped N container(s)`.
pub fn pause(ctx: &Ctx) -> Result<String, TaskError> {
    let (docker, prefix) = (ctx.docker(), prefix(ctx)?);
    ctx.exclusive(&deployer::lock_key(prefix), || {
        let ids: Vec<String> = app_set(&docker, false, prefix)?
            .into_iter()
            .map(|c| c.id)
            .collect();
        if ids.is_empty() {
            return Ok(format!("no running containers for {prefix}"));
        }
        let out = docker.stop_all(&ids)?;
        let n = ids.len();
        Ok(or_else(&out, || {
            format!("stopped {n} container(s) for {prefix}")
        }))
    })
}

/// `unpause` {domain_prefix}: starts the app's containers again, except the ones a
/// replacement set aside (`muvee-<prefix>-old-…`): those are on their way out.
pub fn unpause(ctx: &Ctx) -> Result<String, TaskError> {
    let (docker, prefix) = (ctx.docker(), prefix(ctx)?);
    ctx.exclusive(&deployer::lock_key(prefix), || {
        let ids: Vec<String> = app_set(&docker, true, prefix)?
            .into_iter()
            .filter(|c| !is_aside_of(c, prefix))
            .map(|c| c.id)
            .collect();
        if ids.is_empty() {
            return Ok(format!("no containers for {prefix}"));
        }
        let out = docker.start_all(&ids)?;
        let n = ids.len();
        Ok(or_else(&out, || {
            format!("started {n} container(s) for {prefix}")
        }))
    })
}

fn prefix<'a>(ctx: &'a Ctx) -> Result<&'a str, TaskError> {
    let p = Payload::of(&ctx.task.payload)?;
    Ok(spec::domain_prefix(&p)?)
}

fn or_else(out: &str, msg: impl FnOnce() -> String) -> String {
    match out.trim() {
        "" => msg(),
        s => s.to_string(),
    }
}

fn missing(prefix: &str) -> impl FnOnce(DockerError) -> TaskError + '_ {
    move |e| match e {
        DockerError::NotFound(_) => TaskError::Failed(format!(
            "no container for domain prefix {prefix} on this node: {e}"
        )),
        e => e.into(),
    }
}

/// The container a task about `prefix` acts on: among the ones labelled with it, the current
/// `muvee-<prefix>`, else one that is not an aside of a replacement, preferring a running
/// one; with no labelled container, the exact name `muvee-<prefix>` (the Go agent's).
pub fn resolve(docker: &Docker, prefix: &str) -> Result<String, TaskError> {
    let rows = docker.ps_filter(true, &format!("label=muvee.domain_prefix={prefix}"))?;
    Ok(pick(&rows, prefix))
}

/// The container a control channel session may reach: app `prefix`'s (picked as `resolve`
/// picks), else the one named exactly `name`, and only among this node's apps: labelled
/// `muvee.managed=true` and `muvee.node=<NODE_NAME>`, or the container of compose project
/// `muvee-<prefix>` (older deploys set no `muvee.node` there) when this node staged that
/// project. A compose container counts for app `p` only in project `muvee-<p>` run from
/// DATA_DIR/compose/<p>, whatever its `muvee.*` labels say: a tenant writes those of its
/// own services. None: nothing of ours answers to it.
pub fn node_container(
    docker: &Docker,
    cfg: &Config,
    prefix: &str,
    name: &str,
) -> Result<Option<String>, TaskError> {
    let ours: Vec<PsRow> = docker
        .managed()?
        .into_iter()
        .filter(|r| of_this_node(r, cfg))
        .collect();
    if !prefix.is_empty() {
        let app: Vec<PsRow> = ours
            .into_iter()
            .filter(|r| r.domain_prefix == prefix)
            .collect();
        return Ok((!app.is_empty()).then(|| pick(&app, prefix)));
    }
    Ok(ours.into_iter().find(|r| r.name == name).map(|r| r.name))
}

fn of_this_node(r: &PsRow, cfg: &Config) -> bool {
    let p = r.domain_prefix.as_str();
    let label = p.len() <= 63 && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if p.is_empty() || !label || p.starts_with('-') {
        return false;
    }
    let staged = cfg.data_dir.join("compose").join(p);
    if !r.compose_project.is_empty() && !compose_of(r, p, &staged) {
        return false;
    }
    if !r.node.is_empty() {
        return r.node == cfg.node_name;
    }
    !r.compose_project.is_empty() && staged.is_dir()
}

/// `r` is a container of app `p`'s compose project: named `muvee-<p>`, run from under
/// `staged` (compose CLIs before 1.25 leave the working dir out).
fn compose_of(r: &PsRow, p: &str, staged: &Path) -> bool {
    let real = |d: &Path| std::fs::canonicalize(d).unwrap_or_else(|_| d.to_path_buf());
    let dir = Path::new(&r.compose_dir);
    r.compose_project == format!("muvee-{p}")
        && (r.compose_dir.is_empty() || real(dir).starts_with(real(staged)))
}

fn pick(rows: &[PsRow], prefix: &str) -> String {
    let main = format!("muvee-{prefix}");
    // Every service of a compose app carries its label; the exposed one its port too.
    let rank = |c: &&PsRow| {
        let exposed = !c.expose_port.is_empty();
        (c.name == main, !is_aside_of(c, prefix), exposed, c.running)
    };
    // max_by_key keeps the last of equals; docker lists the newest first.
    let best = rows.iter().rev().max_by_key(rank);
    best.map_or(main.clone(), |c| c.name.clone())
}

/// The containers `pause`/`unpause` act on (running only unless `all`), each once, in the
/// order the three lookups find them.
fn app_set(docker: &Docker, all: bool, prefix: &str) -> Result<Vec<PsRow>, TaskError> {
    let filters = [
        format!("label=muvee.domain_prefix={prefix}"),
        format!("label=com.docker.compose.project=muvee-{prefix}"),
        format!("name=^muvee-{prefix}$"),
    ];
    let mut set: Vec<PsRow> = Vec::new();
    for f in &filters {
        for c in docker.ps_filter(all, f)? {
            if !set.iter().any(|s| s.id == c.id) {
                set.push(c);
            }
        }
    }
    Ok(set)
}

/// The describe document, key order as Go's sorted maps and its structs give it.
#[derive(Serialize)]
struct Describe {
    command: Vec<String>,
    container_name: String,
    created_at: String,
    env_keys: Vec<String>,
    image: String,
    image_sha: String,
    memory_limit: i64,
    mounts: Vec<Mount>,
    ports: BTreeMap<String, Option<Vec<Binding>>>,
    restart_count: u64,
    state: DescribeState,
}

#[derive(Serialize)]
#[allow(non_snake_case)]
struct Mount {
    Type: String,
    Source: String,
    Destination: String,
    Mode: String,
    RW: bool,
}

#[derive(Serialize)]
#[allow(non_snake_case)]
struct Binding {
    HostIp: String,
    HostPort: String,
}

#[derive(Serialize)]
struct DescribeState {
    error: String,
    exit_code: i64,
    finished_at: String,
    health: String,
    oom_killed: bool,
    pid: i64,
    running: bool,
    started_at: String,
    status: String,
}

/// `docker inspect` JSON → the describe document (absent fields read as empty). `command` is
/// `Path` + `Args`: today's agent appends `Config.Cmd` again, which repeats it (W-16).
pub fn describe_doc(v: &Value) -> String {
    let s = |p: &str| {
        v.pointer(p)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    let i = |p: &str| v.pointer(p).and_then(Value::as_i64).unwrap_or(0);
    let b = |p: &str| v.pointer(p).and_then(Value::as_bool).unwrap_or(false);
    let strings = |p: &str| -> Vec<String> {
        let items = v.pointer(p).and_then(Value::as_array).into_iter().flatten();
        items.filter_map(|x| x.as_str().map(String::from)).collect()
    };
    let mut command = vec![s("/Path")];
    command.extend(strings("/Args"));
    let env_keys = strings("/Config/Env")
        .iter()
        .map(|e| e.split_once('=').map_or(e.as_str(), |(k, _)| k).to_string())
        .collect();
    let doc = Describe {
        command,
        container_name: s("/Name").trim_start_matches('/').to_string(),
        created_at: s("/Created"),
        env_keys,
        image: s("/Config/Image"),
        image_sha: s("/Image"),
        memory_limit: i("/HostConfig/Memory"),
        mounts: mounts(v),
        ports: ports(v),
        restart_count: v
            .pointer("/RestartCount")
            .and_then(Value::as_u64)
            .unwrap_or(0),
        state: DescribeState {
            error: s("/State/Error"),
            exit_code: i("/State/ExitCode"),
            finished_at: s("/State/FinishedAt"),
            health: s("/State/Health/Status"),
            oom_killed: b("/State/OOMKilled"),
            pid: i("/State/Pid"),
            running: b("/State/Running"),
            started_at: s("/State/StartedAt"),
            status: s("/State/Status"),
        },
    };
    go_escape(&serde_json::to_string_pretty(&doc).unwrap_or_default())
}

fn mounts(v: &Value) -> Vec<Mount> {
    let items = v
        .pointer("/Mounts")
        .and_then(Value::as_array)
        .into_iter()
        .flatten();
    let s = |m: &Value, k: &str| m.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    items
        .map(|m| Mount {
            Type: s(m, "Type"),
            Source: s(m, "Source"),
            Destination: s(m, "Destination"),
            Mode: s(m, "Mode"),
            RW: m.get("RW").and_then(Value::as_bool).unwrap_or(false),
        })
        .collect()
}

/// `NetworkSettings.Ports`: `{"8080/tcp": [{"HostIp","HostPort"}]}`; an exposed port without
/// a binding is `null`, as docker has it.
fn ports(v: &Value) -> BTreeMap<String, Option<Vec<Binding>>> {
    let Some(map) = v
        .pointer("/NetworkSettings/Ports")
        .and_then(Value::as_object)
    else {
        return BTreeMap::new();
    };
    let s = |b: &Value, k: &str| b.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    map.iter()
        .map(|(port, bindings)| {
            let list = bindings.as_array().map(|items| {
                items
                    .iter()
                    .map(|b| Binding {
                        HostIp: s(b, "HostIp"),
                        HostPort: s(b, "HostPort"),
                    })
                    .collect()
            });
            (port.clone(), list)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::fake::Reply;
    use crate::work::ctx::testing::Harness;
    use crate::work::dispatch;
    use serde_json::json;

    const PS_LABEL: &str = "docker ps -a --filter label=muvee.domain_prefix=app";

    #[test]
    fn a_session_reaches_only_this_nodes_apps() {
        let h = Harness::new("node-container", &[("NODE_NAME", "n1")]);
        let rows = [
            "c1\tmuvee-app\trunning\tapp\td\t80\tn1\t",
            "c2\tmuvee-else\trunning\telse\td\t80\tn2\t",
            "c3\tmuvee-shop-web-1\trunning\tshop\td\t80\t\tmuvee-shop",
            "c4\tmuvee-old-web-1\trunning\told\td\t80\t\tmuvee-old",
        ];
        let ps = "docker ps -a --filter label=muvee.managed=true";
        h.fake.on(ps, Reply::Ok(rows.join("\n") + "\n"));
        // This node staged compose project `shop`, not `old`.
        std::fs::create_dir_all(h.cfg.data_dir.join("compose/shop")).unwrap();
        let docker = h.shared.docker(&h.cfg);
        let find =
            |prefix: &str, name: &str| node_container(&docker, &h.cfg, prefix, name).unwrap();
        assert_eq!(find("app", "").as_deref(), Some("muvee-app"));
        assert_eq!(find("", "muvee-app").as_deref(), Some("muvee-app"));
        assert_eq!(
            find("shop", "muvee-shop").as_deref(),
            Some("muvee-shop-web-1")
        );
        assert_eq!(find("else", "muvee-else"), None);
        assert_eq!(find("", "muvee-else"), None);
        assert_eq!(find("old", "muvee-old"), None);
        assert_eq!(find("", "registry"), None);
    }

    fn row(id: &str, name: &str, running: bool) -> String {
        let state = if running { "running" } else { "exited" };
        format!("{id}\t{name}\t{state}\tapp\tdep-1\t8080\tnode-1\n")
    }

    /// Runs `kind` for prefix `app` and returns the report body.
    fn run(h: &Harness, kind: &str, extra: Value) -> Value {
        let mut p = json!({"domain_prefix": "app"});
        if let (Some(p), Some(extra)) = (p.as_object_mut(), extra.as_object()) {
            p.extend(extra.clone());
        }
        let c = h.with(kind, p, dispatch::execute);
        serde_json::to_value(c).unwrap()
    }

    fn node(name: &str) -> Harness {
        Harness::new(name, &[("NODE_ROLE", "deploy")])
    }

    #[test]
    fn the_current_container_wins_over_asides_and_the_go_name_is_the_fallback() {
        let rows = |list: &[(&str, &str, bool)]| -> Vec<PsRow> {
            list.iter()
                .map(|(id, name, running)| PsRow {
                    id: id.to_string(),
                    name: name.to_string(),
                    running: *running,
                    domain_prefix: "app".into(),
                    ..PsRow::default()
                })
                .collect()
        };
        let aside = ("abcdef123456", "muvee-app-old-abcdef123456", true);
        let current = ("0123456789ab", "muvee-app", false);
        let web = ("ffff00001111", "muvee-app-web-1", false);
        assert_eq!(pick(&rows(&[aside, current]), "app"), "muvee-app");
        assert_eq!(pick(&rows(&[aside, web]), "app"), "muvee-app-web-1");
        assert_eq!(pick(&rows(&[aside]), "app"), "muvee-app-old-abcdef123456");
        assert_eq!(pick(&[], "app"), "muvee-app");
    }

    #[test]
    fn runtime_logs_passes_tail_and_since_and_caps_the_result() {
        let h = node("lc-logs");
        h.fake.on(PS_LABEL, Reply::Ok(row("c1", "muvee-app", true)));
        h.fake
            .on("docker logs", Reply::Ok("line 1\nline \u{0}2\n".into()));
        let r = run(&h, "runtime_logs", json!({"tail": 200.0, "since": "10m"}));
        assert_eq!(
            r,
            json!({"result": "line 1\nline \u{fffd}2\n", "status": "completed"})
        );
        assert_eq!(
            h.fake.ran("docker logs"),
            ["docker logs --tail=200 --since=10m muvee-app"]
        );

        let big = "x".repeat(1000);
        let many = vec![big.as_str(); 1100].join("\n");
        h.fake.on("docker logs", Reply::Ok(many));
        let r = run(&h, "runtime_logs", json!({}));
        let text = r["result"].as_str().unwrap();
        assert_eq!(text.len(), LOG_CAP + TRUNCATED.len());
        assert!(
            text.ends_with("xx\n[truncated]\n"),
            "{}",
            &text[text.len() - 40..]
        );
        assert_eq!(
            h.fake.ran("docker logs").last().unwrap(),
            "docker logs muvee-app"
        );
    }

    #[test]
    fn a_missing_container_is_the_documented_result_not_a_crash() {
        let h = node("lc-missing");
        let gone = "Error response from daemon: No such container: muvee-app";
        for verb in ["docker logs", "docker restart", "docker inspect"] {
            h.fake.on(verb, Reply::Fail(1, gone.into()));
        }
        let ok = |text: &str| json!({"result": text, "status": "completed"});
        assert_eq!(run(&h, "runtime_logs", json!({})), ok(&format!("{gone}\n")));
        assert_eq!(run(&h, "restart", json!({})), ok(gone));
        assert_eq!(
            run(&h, "pause", json!({})),
            ok("no running containers for app")
        );
        assert_eq!(run(&h, "unpause", json!({})), ok("no containers for app"));
        for kind in ["env", "describe"] {
            let r = run(&h, kind, json!({}));
            assert_eq!(r["status"], "failed", "{kind}");
            let why = r["result"].as_str().unwrap();
            assert!(
                why.starts_with(
                    "no container for domain prefix app on this node: docker inspect exited 1"
                ),
                "{kind}: {why}"
            );
        }
        assert!(h.fake.ran("docker stop").is_empty() && h.fake.ran("docker start").is_empty());
    }

    #[test]
    fn payload_fields_are_checked_and_named_before_any_command() {
        let h = node("lc-payload");
        let cases = [
            (
                "restart",
                json!({"domain_prefix": "Bad_Prefix"}),
                "`domain_prefix`",
            ),
            (
                "env",
                json!({"domain_prefix": 7}),
                "`domain_prefix`: expected a string",
            ),
            (
                "pause",
                json!({}),
                "payload field `domain_prefix` is required",
            ),
            (
                "runtime_logs",
                json!({"domain_prefix": "app", "tail": -3}),
                "`tail`",
            ),
            (
                "runtime_logs",
                json!({"domain_prefix": "app", "tail": "200"}),
                "`tail`",
            ),
            (
                "runtime_logs",
                json!({"domain_prefix": "app", "since": "--until=1"}),
                "`since`",
            ),
            (
                "runtime_logs",
                json!({"domain_prefix": "app", "since": 10}),
                "`since`",
            ),
        ];
        for (kind, p, expect) in cases {
            let c = h.with(kind, p.clone(), dispatch::execute);
            assert_eq!(c.status, crate::task::Status::Failed, "{kind} {p}");
            let why = c.result.unwrap_or_default();
            assert!(why.contains(expect), "{kind} {p}: {why}");
        }
        assert!(h.fake.calls().is_empty(), "{:?}", h.fake.calls());
    }

    #[test]
    fn restart_reports_docker_output_or_a_sentence() {
        let h = node("lc-restart");
        h.fake.on("docker restart", Reply::Ok("muvee-app\n".into()));
        assert_eq!(run(&h, "restart", json!({}))["result"], "muvee-app");
        h.fake.on("docker restart", Reply::Ok(String::new()));
        assert_eq!(
            run(&h, "restart", json!({}))["result"],
            "muvee-app restarted"
        );
        h.fake
            .on("docker restart", Reply::Fail(1, "cannot kill".into()));
        let r = run(&h, "restart", json!({}));
        assert_eq!(r["status"], "failed");
        assert_eq!(r["result"], "docker restart exited 1: cannot kill");
    }

    #[test]
    fn pause_stops_the_union_of_the_three_lookups_once_and_unpause_skips_asides() {
        let h = node("lc-pause");
        let labelled = row("c1", "muvee-app", true) + &row("c2", "muvee-app-old-c2", true);
        h.fake.on(
            "docker ps --filter label=muvee.domain_prefix=app",
            Reply::Ok(labelled.clone()),
        );
        h.fake.on(PS_LABEL, Reply::Ok(labelled));
        let compose = row("c3", "muvee-app-db-1", true);
        h.fake.on(
            "docker ps --filter label=com.docker.compose",
            Reply::Ok(compose.clone()),
        );
        h.fake.on(
            "docker ps -a --filter label=com.docker.compose",
            Reply::Ok(compose),
        );
        h.fake.on(
            "docker ps --filter name=^muvee-app$",
            Reply::Ok(row("c1", "muvee-app", true)),
        );
        h.fake.on("docker stop", Reply::Ok("c1\nc2\nc3\n".into()));
        let r = run(&h, "pause", json!({}));
        assert_eq!(r, json!({"result": "c1\nc2\nc3", "status": "completed"}));
        assert_eq!(h.fake.ran("docker stop"), ["docker stop c1 c2 c3"]);

        h.fake.on("docker start", Reply::Ok(String::new()));
        let r = run(&h, "unpause", json!({}));
        assert_eq!(r["result"], "started 2 container(s) for app");
        assert_eq!(h.fake.ran("docker start"), ["docker start c1 c3"]);
        // `docker ps -a` for unpause, plain `docker ps` (running only) for pause.
        assert_eq!(
            h.fake.ran("docker ps -a --filter name=^muvee-app$").len(),
            1
        );
    }

    #[test]
    fn env_is_a_sorted_go_json_object() {
        let env = [
            "PATH=/bin",
            "B=<x>&y",
            "A=1=2",
            "EMPTY=",
            "NOVALUE",
            "A=last",
        ]
        .map(String::from);
        assert_eq!(
            env_json(&env),
            r#"{"A":"last","B":"\u003cx\u003e\u0026y","EMPTY":"","NOVALUE":"","PATH":"/bin"}"#
        );
        let h = node("lc-env");
        h.fake.on(
            "docker inspect",
            Reply::Ok("[\"PORT=8080\",\"PATH=/usr/bin\"]\n".into()),
        );
        let r = run(&h, "env", json!({}));
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"result":"{\"PATH\":\"/usr/bin\",\"PORT\":\"8080\"}","status":"completed"}"#
        );
        assert_eq!(
            h.fake.ran("docker inspect"),
            ["docker inspect --type container --format {{json .Config.Env}} muvee-app"]
        );
    }

    #[test]
    fn describe_summarises_docker_inspect_in_go_order() {
        let inspect = json!({
            "Id": "abc", "Created": "2026-12-02T05:06:26.5Z", "Path": "sh", "Args": ["-c", "httpd"],
            "State": {"Status": "running", "Running": true, "OOMKilled": false, "Pid": 42,
                      "ExitCode": 0, "Error": "", "StartedAt": "s", "FinishedAt": "f",
                      "Health": {"Status": "healthy"}},
            "Image": "sha256:d832", "Name": "/muvee-app", "RestartCount": 2,
            "HostConfig": {"Memory": 67108864},
            "Mounts": [{"Type": "bind", "Source": "/v/p", "Destination": "/ws", "Mode": "rw",
                        "RW": true, "Propagation": "rprivate"}],
            "Config": {"Env": ["PATH=/bin", "TOKEN=x"], "Image": "r/app:1", "Cmd": ["-c", "httpd"]},
            "NetworkSettings": {"Ports": {"8080/tcp": [{"HostIp": "0.0.0.0", "HostPort": "32768"}],
                                          "9090/tcp": null}}
        });
        let expected = r#"{
  "command": [
    "sh",
    "-c",
    "httpd"
  ],
  "container_name": "muvee-app",
  "created_at": "2026-12-02T05:06:26.5Z",
  "env_keys": [
    "PATH",
    "TOKEN"
  ],
  "image": "r/app:1",
  "image_sha": "sha256:d832",
  "memory_limit": 67108864,
  "mounts": [
    {
      "Type": "bind",
      "Source": "/v/p",
      "Destination": "/ws",
      "Mode": "rw",
      "RW": true
    }
  ],
  "ports": {
    "8080/tcp": [
      {
        "HostIp": "0.0.0.0",
        "HostPort": "32768"
      }
    ],
    "9090/tcp": null
  },
  "restart_count": 2,
  "state": {
    "error": "",
    "exit_code": 0,
    "finished_at": "f",
    "health": "healthy",
    "oom_killed": false,
    "pid": 42,
    "running": true,
    "started_at": "s",
    "status": "running"
  }
}"#;
        assert_eq!(describe_doc(&inspect), expected);
        // Nothing usable in the document: empty values, never a panic.
        assert!(describe_doc(&json!(null)).contains("\"command\": [\n    \"\"\n  ]"));
    }
}
