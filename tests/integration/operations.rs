//! Operations parity on a real Docker engine: the lifecycle tasks (`run-task`), workspace
//! ownership for a non-root app, and a deploy node's metrics, health report and reaping
//! against the fake control plane. Images are built from tests/fixtures/deploy-ops.

use crate::fake_cp::{FakeCp, Version};
use crate::test_agent::TestAgent;
use crate::util::{self, require_docker, temp_dir, test_name, RemoveContainers};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

const ROOT_APP: &str = "muvee-it-ops/app:root";
const UID_APP: &str = "muvee-it-ops/app:uid";
const NAMED_APP: &str = "muvee-it-ops/app:named";
const SECRET: &str = "agent-secret-5b1e9d";
const LOG_CAP: usize = 1 << 20;

fn docker_ok(args: &[&str]) -> String {
    util::sh(Command::new(util::docker_cli()).args(args))
}

/// Builds the fixture images once per run, on a re-import of the base image whose root
/// directory others may enter (see the Dockerfile).
fn images() {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        sweep_dead_runs();
        let base = "muvee-it-ops/base:1";
        // Re-imported only when the base image changed, so the builds below stay cached.
        let script = r#"set -e
src=$("$DOCKER" image inspect --format '{{.Id}}' "$BASE")
have=$("$DOCKER" image inspect --format '{{index .Config.Labels "muvee-it.src"}}' "$TAG" 2>/dev/null || true)
[ "$have" = "$src" ] && exit 0
d=$(mktemp -d); c=$("$DOCKER" create "$BASE")
"$DOCKER" export "$c" | tar -C "$d" -x; "$DOCKER" rm "$c" >/dev/null
chmod 755 "$d"
tar -C "$d" -c . | "$DOCKER" import --change "LABEL muvee-it.src=$src" - "$TAG" >/dev/null
rm -rf "$d""#;
        util::sh(
            Command::new("sh")
                .args(["-c", script])
                .env("DOCKER", util::docker_cli())
                .env("BASE", util::base_image())
                .env("TAG", base),
        );
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/deploy-ops");
        for (tag, user) in [
            (ROOT_APP, "0:0"),
            (UID_APP, "1000:1000"),
            (NAMED_APP, "app"),
        ] {
            util::sh(
                Command::new(util::docker_cli())
                    .env("DOCKER_BUILDKIT", "0")
                    .args(["build", "-q", "-t", tag, "--build-arg"])
                    .arg(format!("BASE={base}"))
                    .arg("--build-arg")
                    .arg(format!("APP_USER={user}"))
                    .arg(&dir),
            );
        }
    });
}

/// Containers of an earlier run that was killed (no Drop ran).
fn sweep_dead_runs() {
    let names = docker_ok(&[
        "ps",
        "-a",
        "--filter",
        "name=muvee-ito-",
        "--format",
        "{{.Names}}",
    ]);
    for name in names.lines() {
        let pid = name
            .split('-')
            .find(|s| s.bytes().all(|b| b.is_ascii_digit()));
        if pid.is_some_and(|p| !Path::new("/proc").join(p).exists()) {
            let _ = util::docker(&["rm", "-f", name], &[]);
        }
    }
}

/// One app under test: a unique prefix, its DATA_DIR and workspace root; its containers are
/// removed whatever happens.
struct Ops {
    prefix: String,
    data: PathBuf,
    volumes: PathBuf,
    _cleanup: RemoveContainers,
}

impl Ops {
    fn new(name: &str) -> Ops {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let prefix = format!("ito-{name}-{}-{n}", std::process::id());
        Ops {
            _cleanup: RemoveContainers::named(&format!("muvee-{prefix}")),
            prefix,
            data: temp_dir("ops-data"),
            volumes: temp_dir("ops-vol"),
        }
    }

    fn name(&self) -> String {
        format!("muvee-{}", self.prefix)
    }

    /// `run-task --type kind` with `payload` (domain_prefix added); returns the report.
    fn task(&self, kind: &str, mut payload: Value) -> Value {
        payload["domain_prefix"] = json!(self.prefix);
        let vol = self.volumes.display().to_string();
        let out = util::run_task(
            &["--type", kind, "--volume-nfs-base-path", &vol],
            &payload.to_string(),
            &[
                ("DATA_DIR", self.data.to_str().unwrap()),
                ("DEPLOY_DRAIN", "0s"),
            ],
        );
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|_| panic!("{kind}: no report: {}", util::describe(&out)))
    }

    fn ok(&self, kind: &str, payload: Value) -> String {
        let r = self.task(kind, payload);
        assert_eq!(r["status"], "completed", "{kind}: {r}");
        r["result"].as_str().unwrap_or_default().to_string()
    }

    fn deploy(&self, image: &str, extra: Value) -> u16 {
        let mut p = json!({"image_tag": image, "deployment_id": "dep-o1", "project_id": self.prefix,
                           "container_port": 8080, "memory_limit": "64m",
                           "env_vars": {"BODY": "ops"}});
        if let (Some(p), Some(extra)) = (p.as_object_mut(), extra.as_object()) {
            p.extend(extra.clone());
        }
        let r = self.task("deploy", p);
        assert_eq!(r["status"], "completed", "{r}");
        r["host_port"].as_u64().unwrap() as u16
    }

    /// Plants a container as if we had started it (`labels`), running `cmd` in the base image.
    fn plant(&self, name: &str, labels: &[String], extra: &[&str], cmd: &str) {
        let mut args = vec!["run", "-d", "--name", name];
        for l in labels {
            args.extend(["--label", l]);
        }
        args.extend(extra);
        let base = util::base_image();
        args.extend([base.as_str(), "sh", "-c", cmd]);
        docker_ok(&args);
    }

    fn labels(&self, node: &str) -> Vec<String> {
        vec![
            format!("muvee.domain_prefix={}", self.prefix),
            "muvee.managed=true".into(),
            format!("muvee.node={node}"),
        ]
    }

    fn inspect(&self, format: &str) -> String {
        docker_ok(&["inspect", "--format", format, &self.name()])
            .trim()
            .to_string()
    }

    /// The IPv4 host port of 8080/tcp now (it may change when docker restarts the container).
    fn port(&self) -> Option<u16> {
        let out = util::docker(&["port", &self.name(), "8080/tcp"], &[]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.lines()
            .find_map(|l| l.strip_prefix("0.0.0.0:"))
            .and_then(|p| p.trim().parse().ok())
    }

    fn names(&self) -> Vec<String> {
        let filter = format!("name=muvee-{}", self.prefix);
        let out = docker_ok(&["ps", "-a", "--filter", &filter, "--format", "{{.Names}}"]);
        let mut v: Vec<String> = out.lines().map(String::from).collect();
        v.sort();
        v
    }
}

/// Polls until the app answers HTTP on its current port; returns that port.
fn answers(app: &Ops) -> u16 {
    let mut port = 0;
    let up = util::poll(15, || {
        port = app.port().unwrap_or(0);
        port != 0 && util::http_get(port, "/").is_some_and(|b| b == "ok\n")
    });
    assert!(up, "{} does not answer HTTP", app.name());
    port
}

#[test]
fn lifecycle_tasks_on_a_real_container() {
    if !require_docker(test_name!()) {
        return;
    }
    images();
    let app = Ops::new("life");
    let port = app.deploy(ROOT_APP, json!({}));
    assert!(util::http_get(port, "/").is_some());
    let name = app.name();

    // Logs: stdout and stderr; --tail 1 is the last line; a `since` in the future is empty.
    assert!(util::poll(5, || app.ok("runtime_logs", json!({})).len() == 22));
    let mut lines: Vec<String> = app
        .ok("runtime_logs", json!({}))
        .lines()
        .map(String::from)
        .collect();
    lines.sort();
    assert_eq!(lines, ["err-marker", "out-marker"]);
    assert_eq!(app.ok("runtime_logs", json!({"tail": 1})), "err-marker\n");
    let later = (std::time::SystemTime::now() + Duration::from_secs(3600))
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert_eq!(
        app.ok(
            "runtime_logs",
            json!({"since": later.to_string(), "tail": 5})
        ),
        ""
    );

    // Env: the container's own environment, sorted, compact.
    let env: Vec<String> = serde_json::from_str(&app.inspect("{{json .Config.Env}}")).unwrap();
    let map: BTreeMap<&str, &str> = env.iter().filter_map(|e| e.split_once('=')).collect();
    assert_eq!(
        app.ok("env", json!({})),
        serde_json::to_string(&map).unwrap()
    );
    assert!(map.get("BODY") == Some(&"ops"));

    describe_matches_docker_inspect(&app, port);

    // Restart: docker's output; the app comes back.
    assert_eq!(app.ok("restart", json!({})), name);
    answers(&app);

    // Pause stops it (docker prints the id), a second pause finds nothing running; unpause
    // brings it back on a port that answers.
    let id = app.inspect("{{.Id}}")[..12].to_string();
    assert_eq!(app.ok("pause", json!({})), id);
    assert_eq!(app.inspect("{{.State.Status}}"), "exited");
    assert_eq!(
        app.ok("pause", json!({})),
        format!("no running containers for {}", app.prefix)
    );
    assert_eq!(app.ok("unpause", json!({})), id);
    answers(&app);
}

/// `describe` against `docker inspect` of the same container, byte for byte in its layout.
fn describe_matches_docker_inspect(app: &Ops, port: u16) {
    let text = app.ok("describe", json!({}));
    let d: Value = serde_json::from_str(&text).unwrap();
    let inspect: Value = serde_json::from_str(&app.inspect("{{json .}}")).unwrap();
    assert_eq!(d["container_name"], app.name());
    assert_eq!(d["image"], ROOT_APP);
    assert_eq!(d["image_sha"], inspect["Image"]);
    assert_eq!(d["created_at"], inspect["Created"]);
    assert_eq!(d["memory_limit"], 64 << 20);
    assert_eq!(d["restart_count"], 0);
    assert_eq!(d["state"]["running"], true);
    assert_eq!(d["state"]["pid"], inspect["State"]["Pid"]);
    assert_eq!(d["command"], json!(["sh", "-c", inspect["Args"][1]]));
    assert!(d["env_keys"].as_array().unwrap().contains(&json!("BODY")));
    let bindings = d["ports"]["8080/tcp"].as_array().unwrap();
    assert!(
        bindings
            .iter()
            .any(|b| b["HostPort"].as_str() == Some(&*port.to_string())),
        "{text}"
    );
    // Go's MarshalIndent layout: 2 spaces, top-level keys in this order.
    assert!(
        text.starts_with("{\n  \"command\": [\n    \"sh\",\n    \"-c\",\n"),
        "{text}"
    );
    let keys = [
        "command",
        "container_name",
        "created_at",
        "env_keys",
        "image",
        "image_sha",
        "memory_limit",
        "mounts",
        "ports",
        "restart_count",
        "state",
    ];
    let at: Vec<usize> = keys
        .iter()
        .map(|k| {
            text.find(&format!("\n  \"{k}\": "))
                .unwrap_or_else(|| panic!("{k}: {text}"))
        })
        .collect();
    assert!(at.windows(2).all(|w| w[0] < w[1]), "{text}");
    assert!(text.ends_with("\n  }\n}"), "{text}");
}

#[test]
fn missing_containers_give_the_documented_results() {
    if !require_docker(test_name!()) {
        return;
    }
    let app = Ops::new("gone");
    let gone = format!(
        "Error response from daemon: No such container: {}",
        app.name()
    );
    assert_eq!(app.ok("runtime_logs", json!({})), format!("{gone}\n"));
    assert_eq!(app.ok("restart", json!({})), gone);
    let p = &app.prefix;
    assert_eq!(
        app.ok("pause", json!({})),
        format!("no running containers for {p}")
    );
    assert_eq!(
        app.ok("unpause", json!({})),
        format!("no containers for {p}")
    );
    for kind in ["env", "describe"] {
        let r = app.task(kind, json!({}));
        assert_eq!(r["status"], "failed", "{r}");
        let why = r["result"].as_str().unwrap();
        assert!(
            why.starts_with(&format!("no container for domain prefix {p} on this node")),
            "{why}"
        );
    }
}

#[test]
fn runtime_logs_are_capped_at_1_mib_and_sanitised() {
    if !require_docker(test_name!()) {
        return;
    }
    let app = Ops::new("biglog");
    let labels = app.labels("elsewhere");
    let cmd = r#"printf 'a\000b\033c\n'; yes 0123456789abcdef | head -c 1200000; echo; sleep 600"#;
    app.plant(&app.name(), &labels, &[], cmd);
    let full = || util::docker(&["logs", &app.name()], &[]).stdout.len() >= 1_200_000;
    assert!(util::poll(15, full), "the container did not print its log");
    let text = app.ok("runtime_logs", json!({}));
    let mut raw = b"a\0b\x1bc\n".to_vec();
    raw.extend("0123456789abcdef\n".repeat(1_200_000 / 17 + 1).as_bytes());
    let head = String::from_utf8(raw[..LOG_CAP].to_vec()).unwrap();
    // Only NUL changes: the escape reaches the server as the app printed it.
    let expected = head.replace('\0', "\u{fffd}") + "\n[truncated]\n";
    assert_eq!(text.len(), expected.len());
    assert!(
        text == expected,
        "differs at byte {:?}",
        text.bytes().zip(expected.bytes()).position(|(a, b)| a != b)
    );
}

#[test]
fn describe_counts_restarts_and_oom_kills() {
    if !require_docker(test_name!()) {
        return;
    }
    let crash = Ops::new("crash");
    crash.plant(
        &crash.name(),
        &crash.labels("elsewhere"),
        &["--restart", "always"],
        "echo boom; exit 3",
    );
    let oom = Ops::new("oom");
    let limit = ["--memory", "16m", "--memory-swap", "16m"];
    oom.plant(
        &oom.name(),
        &oom.labels("elsewhere"),
        &limit,
        "head -c 100000000 /dev/zero | tail",
    );
    assert!(util::poll(15, || crash.inspect("{{.RestartCount}}") != "0"));
    assert!(util::poll(15, || oom.inspect("{{.State.Status}}") == "exited"));
    // The engine may mark the OOM kill after the exit (containerd's OOM event can come
    // second): describe reports the engine's state, so wait until the engine has it.
    assert!(util::poll(15, || oom.inspect("{{.State.OOMKilled}}") == "true"));
    let d: Value = serde_json::from_str(&crash.ok("describe", json!({}))).unwrap();
    assert!(d["restart_count"].as_u64().unwrap() >= 1, "{d}");
    assert_eq!(d["command"], json!(["sh", "-c", "echo boom; exit 3"]));
    let d: Value = serde_json::from_str(&oom.ok("describe", json!({}))).unwrap();
    assert_eq!(d["state"]["oom_killed"], true, "{d}");
    assert_eq!(d["state"]["exit_code"], 137);
    assert_eq!(d["state"]["running"], false);
    assert_eq!(d["memory_limit"], 16 << 20);
}

#[test]
fn a_fresh_workspace_is_written_by_a_non_root_app() {
    if !require_docker(test_name!()) {
        return;
    }
    images();
    let ws = json!({"volume_mount_path": "/workspace", "env_vars": {"WS": "/workspace"}});
    let owner_file = |app: &Ops| app.volumes.join(&app.prefix).join("owner.txt");
    for (image, uid, gid) in [(UID_APP, 1000, 1000), (NAMED_APP, 1001, 1002)] {
        let app = Ops::new("ws");
        app.deploy(image, ws.clone());
        let dir = app.volumes.join(&app.prefix);
        let m = std::fs::symlink_metadata(&dir).unwrap();
        assert_eq!((m.uid(), m.gid()), (uid, gid), "{image}");
        assert!(
            util::poll(5, || owner_file(&app).is_file()),
            "{image}: the app did not write"
        );
        assert_eq!(
            std::fs::read_to_string(owner_file(&app)).unwrap(),
            format!("{uid}\n")
        );
    }
    // An existing workspace is not changed: the app cannot write a root-owned one.
    let app = Ops::new("ws-old");
    std::fs::create_dir_all(app.volumes.join(&app.prefix)).unwrap();
    app.deploy(UID_APP, ws);
    let dir = app.volumes.join(&app.prefix);
    assert_eq!(std::fs::metadata(&dir).unwrap().uid(), 0);
    assert!(util::poll(5, || app
        .ok("runtime_logs", json!({}))
        .contains("cannot-write-workspace")));
    assert!(!owner_file(&app).exists());
}

#[test]
fn deploy_node_reports_metrics_and_health_and_reaps_only_its_leftovers() {
    if !require_docker(test_name!()) {
        return;
    }
    let app = Ops::new("reap");
    let dir = temp_dir("ops-agent");
    let node = dir.file_name().unwrap().to_str().unwrap().to_string();
    let name = app.name();
    let sleep = "sleep 600";
    let publish = ["-p", "0:8080", "--memory", "64m"];
    app.plant(&name, &app.labels(&node), &publish, sleep);
    let leftover = format!("{name}-old-0123456789ab");
    app.plant(&leftover, &app.labels(&node), &[], sleep);
    let unlabelled = format!("{name}-old-feedfacecafe");
    app.plant(&unlabelled, &[], &[], sleep);
    let foreign = format!("{name}-old-aaaaaaaaaaaa");
    app.plant(&foreign, &app.labels("another-node"), &[], sleep);
    // Apps of other installations on the same engine: another node's, and a plain container
    // whose name looks like an app's. Neither is reported.
    let (theirs, plain) = (Ops::new("theirs"), Ops::new("plain"));
    theirs.plant(
        &theirs.name(),
        &theirs.labels("another-node"),
        &publish,
        sleep,
    );
    plain.plant(&plain.name(), &[], &publish, sleep);

    let cp = FakeCp::start(Version::Today, SECRET);
    let path = ("PATH", "/usr/local/bin:/usr/bin:/bin");
    let env = [path, ("HEARTBEAT_INTERVAL", "1s"), ("REAP_GRACE", "2s")];
    let agent = TestAgent::builder("deploy")
        .cp(&cp)
        .dir(&dir)
        .envs(&env)
        .start();
    let mine = |cp: &FakeCp| -> Vec<Value> {
        cp.posted("/api/agent/container-metrics")
            .iter()
            .flat_map(|v| v.as_array().cloned().unwrap_or_default())
            .filter(|m| m["domain_prefix"] == app.prefix.as_str())
            .collect()
    };
    cp.wait_for("container metrics", Duration::from_secs(20), |cp| {
        !mine(cp).is_empty()
    });
    let m = &mine(&cp)[0];
    assert_eq!(m["mem_limit_bytes"], 64 << 20, "{m}");
    let used = m["mem_usage_bytes"].as_u64().unwrap();
    assert!(used > 0 && used < 64 << 20, "{m}");
    let cpu = m["cpu_percent"].as_f64().unwrap();
    assert!((0.0..=100.0 * 64.0).contains(&cpu), "{m}");
    for k in [
        "net_rx_bytes",
        "net_tx_bytes",
        "block_read_bytes",
        "block_write_bytes",
    ] {
        assert!(m[k].is_u64(), "{k}: {m}");
    }
    let statuses = cp.posted("/api/agent/container-statuses");
    let listed = |s: &Value| {
        let items = s.as_array().into_iter().flatten();
        items
            .into_iter()
            .any(|s| s["domain_prefix"] == app.prefix.as_str())
    };
    assert!(statuses.iter().any(listed), "{statuses:?}");
    let all = format!(
        "{statuses:?} {:?}",
        cp.posted("/api/agent/container-metrics")
    );
    for other in [&theirs.prefix, &plain.prefix] {
        assert!(
            !all.contains(&format!("\"{other}\"")),
            "{other} reported: {all}"
        );
    }

    cp.wait_for("a health report", Duration::from_secs(20), |cp| {
        !cp.requests_to("/api/agent/health-report").is_empty()
    });
    let report = cp.requests_to("/api/agent/health-report")[0].clone();
    assert_eq!(report.status, Some(204));
    let checks = report.json().unwrap();
    let docker = checks
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "docker")
        .unwrap();
    assert_eq!(docker["status"], "ok", "{checks}");
    assert!(
        docker["message"].as_str().unwrap().starts_with("engine "),
        "{checks}"
    );

    assert!(
        util::poll(20, || !app.names().contains(&leftover)),
        "the leftover was not reaped:\n{}",
        agent.log()
    );
    let mut left = vec![name.clone(), unlabelled, foreign];
    left.sort();
    assert_eq!(app.names(), left);
    assert!(
        agent.log().contains(&format!("reaper: removed {leftover}")),
        "{}",
        agent.log()
    );
}

/// No engine needed: both roles send the checks to today's server; the March 2026 server
/// answers 404 once and hears no more about it, with no warning in the log.
#[test]
fn health_reports_for_today_and_a_quiet_stop_on_march() {
    let today = FakeCp::start(Version::Today, SECRET);
    let dir = temp_dir("ops-health-today");
    let _a = TestAgent::builder("builder")
        .cp(&today)
        .dir(&dir)
        .env("HEARTBEAT_INTERVAL", "1s")
        .start();
    today.wait_for("a health report", Duration::from_secs(20), |cp| {
        !cp.requests_to("/api/agent/health-report").is_empty()
    });
    let node = today.node_id_for_role("builder").unwrap();
    let r = today.requests_to("/api/agent/health-report")[0].clone();
    assert_eq!(r.target, format!("/api/agent/health-report?node_id={node}"));
    assert_eq!(r.status, Some(204));
    let checks = r.json().unwrap();
    for c in checks.as_array().unwrap() {
        let keys: Vec<&String> = c.as_object().unwrap().keys().collect();
        assert!(
            ["ok", "warning", "error"].contains(&c["status"].as_str().unwrap()),
            "{c}"
        );
        assert!(
            keys.iter()
                .all(|k| ["name", "status", "message", "hint"].contains(&k.as_str())),
            "{c}"
        );
    }
    let names: Vec<&str> = checks
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    for n in ["git", "docker", "docker_buildx", "data_dir", "registry"] {
        assert!(names.contains(&n), "{n} missing: {checks}");
    }
    assert_eq!(today.nodes()[0]["health_report"], checks);

    let march = FakeCp::start(Version::March, SECRET);
    let dir = temp_dir("ops-health-march");
    let a = TestAgent::builder("deploy")
        .cp(&march)
        .dir(&dir)
        .env("HEARTBEAT_INTERVAL", "1s")
        .start();
    march.wait_for("a health report", Duration::from_secs(20), |cp| {
        !cp.requests_to("/api/agent/health-report").is_empty()
    });
    std::thread::sleep(Duration::from_secs(2));
    let sent = march.requests_to("/api/agent/health-report");
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].status, Some(404));
    let log = a.log();
    assert!(
        !log.lines()
            .any(|l| (l.contains("WARN") || l.contains("ERROR")) && l.contains("health")),
        "{log}"
    );
}
