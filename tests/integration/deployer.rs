//! Deploy role on a real Docker engine: `muvee-agent run-task --type deploy` with images
//! built from tests/fixtures/deploy-*, real rsync, and plain directories as the NFS share.

use crate::util::{self, require_docker, temp_dir, test_name, ArgvSampler, RemoveContainers};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

pub const APP: &str = "muvee-it-deploy/app:1";
const CRASH: &str = "muvee-it-deploy/crash:1";
pub const IDLE: &str = "muvee-it-deploy/idle:1";

/// Builds the three fixture images once per test run.
pub fn images() {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        // Containers of an earlier run that was killed (no Drop ran) restart with the engine.
        for name in containers("itd-") {
            let pid = name
                .split('-')
                .find(|s| s.bytes().all(|b| b.is_ascii_digit()));
            if pid.is_some_and(|p| !Path::new("/proc").join(p).exists()) {
                let _ = util::docker(&["rm", "-f", &name], &[]);
            }
        }
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        for (tag, dir) in [
            (APP, "deploy-app"),
            (CRASH, "deploy-crash"),
            (IDLE, "deploy-idle"),
        ] {
            util::sh(
                Command::new(util::docker_cli())
                    .env("DOCKER_BUILDKIT", "0")
                    .args(["build", "-q", "-t", tag])
                    .arg(fixtures.join(dir)),
            );
        }
    });
}

fn uniq(what: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{what}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

fn docker_ok(args: &[&str]) -> String {
    util::sh(Command::new(util::docker_cli()).args(args))
}

/// Names of all containers (any state) whose name contains `muvee-<prefix>`.
pub fn containers(prefix: &str) -> Vec<String> {
    docker_ok(&[
        "ps",
        "-a",
        "--filter",
        &format!("name=muvee-{prefix}"),
        "--format",
        "{{.Names}}",
    ])
    .lines()
    .map(String::from)
    .collect()
}

/// One app under test: a unique prefix, its DATA_DIR and share, and a guard that removes
/// its containers whatever happens.
struct App {
    prefix: String,
    data: PathBuf,
    share: PathBuf,
    volumes: PathBuf,
    env: Vec<(String, String)>,
    /// A command the agent runs under (strace).
    wrapper: Vec<String>,
    _cleanup: RemoveContainers,
}

impl App {
    fn new(name: &str) -> App {
        let prefix = uniq(name);
        App {
            _cleanup: RemoveContainers::named(&format!("muvee-{prefix}")),
            prefix,
            data: temp_dir("deploy-data"),
            share: temp_dir("deploy-share"),
            volumes: temp_dir("deploy-vol"),
            env: vec![("DEPLOY_DRAIN".into(), "1s".into())],
            wrapper: Vec::new(),
        }
    }

    fn set(&mut self, k: &str, v: &str) {
        self.env.retain(|(n, _)| n != k);
        self.env.push((k.into(), v.into()));
    }

    fn payload(&self, deployment_id: &str, image: &str, body: &str) -> Value {
        json!({
            "image_tag": image,
            "deployment_id": deployment_id,
            "project_id": "proj-1",
            "domain_prefix": self.prefix,
            "auth_required": false,
            "auth_domains": "",
            "container_port": 8080.0,
            "memory_limit": "64m",
            "volume_mount_path": "",
            "datasets": null,
            "env_vars": {"BODY": body},
        })
    }

    fn args(&self) -> Vec<String> {
        vec![
            "--dataset-nfs-base-path".into(),
            self.share.display().to_string(),
            "--volume-nfs-base-path".into(),
            self.volumes.display().to_string(),
        ]
    }

    /// Runs one task (a bare deploy payload, or a whole task JSON when `kind` is None).
    fn run(&self, kind: Option<&str>, input: &Value) -> Run {
        let mut args: Vec<String> = kind
            .map(|k| vec!["--type".to_string(), k.to_string()])
            .unwrap_or_default();
        args.extend(self.args());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut env: Vec<(&str, &str)> = vec![("DATA_DIR", self.data.to_str().unwrap())];
        env.extend(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let wrapper: Vec<&str> = self.wrapper.iter().map(String::as_str).collect();
        let out = util::run_task_under(&wrapper, &args, &input.to_string(), &env);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let report: Value = serde_json::from_str(stdout.trim())
            .unwrap_or_else(|_| panic!("no report: {}", util::describe(&out)));
        Run {
            report,
            log: String::from_utf8_lossy(&out.stderr).into_owned(),
            code: out.status.code(),
        }
    }

    fn deploy(&self, payload: &Value) -> Run {
        self.run(Some("deploy"), payload)
    }

    /// Deploys and asserts success; returns the host port.
    fn deploy_ok(&self, payload: &Value) -> (u16, Run) {
        let r = self.deploy(payload);
        assert_eq!(r.report["status"], "completed", "{r:?}");
        assert_eq!(r.code, Some(0));
        let port = r.report["host_port"].as_u64().unwrap() as u16;
        assert!(port > 0);
        (port, r)
    }

    fn container(&self) -> String {
        format!("muvee-{}", self.prefix)
    }
}

#[derive(Debug)]
struct Run {
    report: Value,
    log: String,
    code: Option<i32>,
}

fn body(port: u16) -> String {
    util::http_get(port, "/").unwrap_or_else(|| panic!("no HTTP answer on {port}"))
}

#[test]
fn deploy_serves_http_with_env_datasets_and_workspace() {
    if !require_docker(test_name!()) {
        return;
    }
    images();
    let app = App::new("itd-main");
    std::fs::create_dir_all(app.share.join("team/ref")).unwrap();
    std::fs::write(app.share.join("team/ref/file.txt"), "dataset-content-1\n").unwrap();
    std::fs::create_dir_all(app.share.join("team/scratch")).unwrap();
    let ds_id = uniq("ds");
    let secret = "s3cret-body-7f3a9c";
    let cli_secret = "tcp://203.0.113.9:2375";
    let mut p = app.payload("dep-a1", APP, secret);
    p["env_vars"]["DOCKER_HOST"] = json!(cli_secret);
    p["volume_mount_path"] = json!("/workspace");
    p["datasets"] = json!([
        {"id": ds_id, "name": "ref", "nfs_path": "team/ref", "version": 1.0, "size_bytes": 18, "mount_mode": "dependency"},
        {"id": uniq("rw"), "name": "scratch", "nfs_path": "team/scratch", "version": 1, "size_bytes": 0, "mount_mode": "readwrite"},
    ]);

    let sampler = ArgvSampler::start();
    let (port, r) = app.deploy_ok(&p);
    let argvs = sampler.finish();
    let page = body(port);
    assert!(page.contains(&format!("body={secret}")), "{page}");
    assert!(page.contains("dataset-content-1"), "{page}");

    // Env values reach the container, never argv or the logs.
    let env = docker_ok(&["exec", &app.container(), "env"]);
    assert!(env.contains(&format!("BODY={secret}")), "{env}");
    assert!(env.contains(&format!("DOCKER_HOST={cli_secret}")), "{env}");
    for a in &argvs {
        assert!(!a.contains(secret) && !a.contains(cli_secret), "argv: {a}");
    }
    assert!(
        argvs.iter().any(|a| a.contains(" run -d ")),
        "sampler saw no docker run"
    );
    assert!(
        !r.log.contains(secret) && !r.log.contains(cli_secret),
        "{}",
        r.log
    );
    assert!(util::files_containing(&app.data, secret).is_empty());

    // Dependency: read-only copy at /data/<name>; readwrite: the share itself.
    let c = app.container();
    assert_eq!(
        docker_ok(&["exec", &c, "cat", "/data/ref/file.txt"]),
        "dataset-content-1\n"
    );
    let w = util::docker(&["exec", &c, "sh", "-c", "echo x > /data/ref/new.txt"], &[]);
    assert!(!w.status.success(), "write to a dependency dataset worked");
    docker_ok(&[
        "exec",
        &c,
        "sh",
        "-c",
        "echo from-app > /data/scratch/out.txt",
    ]);
    assert_eq!(
        std::fs::read_to_string(app.share.join("team/scratch/out.txt")).unwrap(),
        "from-app\n"
    );
    docker_ok(&["exec", &c, "sh", "-c", "echo ws > /workspace/w.txt"]);
    assert!(app.volumes.join("proj-1/w.txt").is_file());
    let object = app.data.join("objects").join(&ds_id).join("v1");
    assert!(object.join("file.txt").is_file());
    assert!(std::fs::read_link(app.data.join("mounts/dep-a1/ref")).is_ok());

    // Same dataset version again: nothing is copied (a marker in the cache survives).
    std::fs::write(object.join("marker"), "kept").unwrap();
    let mut p2 = p.clone();
    p2["deployment_id"] = json!("dep-a2");
    let (port2, r2) = app.deploy_ok(&p2);
    assert!(r2.log.contains("is cached, nothing to copy"), "{}", r2.log);
    assert!(!r2.log.contains("copying version"), "{}", r2.log);
    assert!(
        object.join("marker").is_file(),
        "the cached copy was re-synced"
    );
    assert!(body(port2).contains("dataset-content-1"));
    // The retired deployment's mount dir is gone, the old container too.
    assert!(!app.data.join("mounts/dep-a1").exists());
    assert!(app.data.join("mounts/dep-a2/ref").exists());
    assert_eq!(containers(&app.prefix), vec![app.container()]);
    // A cleanup of another app that names this deployment leaves its mounts alone: the
    // running container still needs them (at its next restart).
    let other = format!("{}-other", app.prefix);
    let task = json!({"ID": util::new_uuid(), "Type": "cleanup", "DeploymentID": "dep-a2",
                      "Payload": {"domain_prefix": other}});
    let r = app.run(None, &task);
    assert_eq!(r.report["status"], "completed", "{r:?}");
    assert!(app.data.join("mounts/dep-a2/ref").exists(), "{}", r.log);
}

#[test]
fn redeploy_under_load_drops_no_request() {
    if !require_docker(test_name!()) {
        return;
    }
    images();
    let mut app = App::new("itd-load");
    app.set("DEPLOY_DRAIN", "2s");
    let (port1, _) = app.deploy_ok(&app.payload("dep-l1", APP, "one"));
    assert!(body(port1).contains("body=one"));

    // A client hits whatever port the control plane would route to: the old one until
    // the agent reports, then the new one.
    let target = Arc::new(AtomicU16::new(port1));
    let stop = Arc::new(AtomicBool::new(false));
    let stats = Arc::new(Mutex::new((0usize, Vec::<String>::new(), String::new())));
    let poller = {
        let (target, stop, stats) = (target.clone(), stop.clone(), stats.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let port = target.load(Ordering::SeqCst);
                let got = util::http_get(port, "/");
                let mut s = stats.lock().unwrap();
                match got {
                    Some(b) => {
                        s.0 += 1;
                        s.2 = b;
                    }
                    None => s.1.push(format!("port {port}")),
                }
                drop(s);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };

    let mut cmd = Command::new(util::bin());
    cmd.args(["run-task", "--type", "deploy"])
        .env("DATA_DIR", &app.data)
        .env("DOCKER_CONFIG", temp_dir("dockercfg"))
        .env("DEPLOY_DRAIN", "2s")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(app.payload("dep-l2", APP, "two").to_string().as_bytes())
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let report: Value = serde_json::from_str(line.trim()).expect("report line");
    assert_eq!(report["status"], "completed", "{report}");
    let port2 = report["host_port"].as_u64().unwrap() as u16;
    assert_ne!(port1, port2);
    target.store(port2, Ordering::SeqCst);
    // The report goes out before the drain: the process is still draining the old one.
    let reported = Instant::now();
    let out = child.wait_with_output().unwrap();
    assert!(
        reported.elapsed() >= Duration::from_millis(1000),
        "exited {:?} after the report: no drain?",
        reported.elapsed()
    );
    assert!(out.status.success(), "{}", util::describe(&out));
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    poller.join().unwrap();

    let (ok, failed, last) = stats.lock().unwrap().clone();
    eprintln!(
        "redeploy under load: {ok} requests answered, {} failed",
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "{} failed requests: {failed:?}",
        failed.len()
    );
    assert!(ok >= 20, "only {ok} requests");
    assert!(last.contains("body=two"), "{last}");
    assert!(
        util::http_get(port1, "/").is_none(),
        "old container still serving"
    );
    assert_eq!(containers(&app.prefix), vec![app.container()]);
}

#[test]
fn failed_redeploys_keep_the_old_container_serving() {
    if !require_docker(test_name!()) {
        return;
    }
    images();
    let mut app = App::new("itd-fail");
    let (port, _) = app.deploy_ok(&app.payload("dep-f1", APP, "stable"));
    let name = app.container();
    let id = || docker_ok(&["inspect", "--format", "{{.Id}}", &name]);
    let id1 = id();

    // A process that exits at once: failed with its logs, old one untouched.
    let r = app.deploy(&app.payload("dep-f2", CRASH, "x"));
    assert_eq!(r.report["status"], "failed", "{r:?}");
    assert_eq!(r.code, Some(1));
    let why = r.report["result"].as_str().unwrap();
    assert!(why.contains("crash-marker: cannot start"), "{why}");
    assert!(why.contains("previous container keeps serving"), "{why}");
    assert_eq!(id(), id1);
    assert!(body(port).contains("body=stable"));
    assert_eq!(containers(&app.prefix), vec![app.container()]);

    // Running but not answering HTTP (docker-proxy still accepts TCP): health timeout.
    app.set("DEPLOY_HEALTH_TIMEOUT", "3s");
    let r = app.deploy(&app.payload("dep-f3", IDLE, "x"));
    assert_eq!(r.report["status"], "failed", "{r:?}");
    let why = r.report["result"].as_str().unwrap();
    assert!(why.contains("no HTTP answer"), "{why}");
    assert_eq!(id(), id1);
    assert!(body(port).contains("body=stable"));

    // A tag that does not exist: fails at the pull, before anything is touched.
    let r = app.deploy(&app.payload("dep-f4", "muvee-it-deploy/nope:missing", "x"));
    assert_eq!(r.report["status"], "failed", "{r:?}");
    let why = r.report["result"].as_str().unwrap();
    assert!(why.contains("docker pull"), "{why}");
    assert!(!r.log.contains("Renaming"), "{}", r.log);
    assert_eq!(id(), id1);
    assert!(body(port).contains("body=stable"));
    assert_eq!(containers(&app.prefix), vec![app.container()]);
    // Failed deployments leave no mount dirs behind.
    assert!(!app.data.join("mounts/dep-f2").exists());
}

/// Env values are masked however many a payload carries: the registry of secrets has no
/// cap that could drop one of a running task's values.
#[test]
fn ten_thousand_env_values_stay_masked_in_the_report_and_the_log() {
    if !require_docker(test_name!()) {
        return;
    }
    images();
    let app = App::new("itd-mask");
    let password = format!("db-password-{}", uniq("pw"));
    let mut p = app.payload("dep-m1", CRASH, &password);
    for i in 0..10_000 {
        p["env_vars"][format!("VAR_{i}")] = json!(format!("value-{i:06}-xyz"));
    }
    let r = app.deploy(&p);
    assert_eq!(r.report["status"], "failed", "{r:?}");
    let why = r.report["result"].as_str().unwrap();
    assert!(
        why.contains("crash-marker: cannot start; body=***"),
        "{why}"
    );
    assert!(!why.contains(&password) && !r.log.contains(&password));
    assert!(!r.log.contains("value-009999-xyz"));
}

#[test]
fn fixed_host_port_replacement_and_rollback() {
    if !require_docker(test_name!()) {
        return;
    }
    images();
    let app = App::new("itd-fixed");
    let fixed = {
        let l = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let payload = |dep: &str, image: &str, body: &str| {
        let mut p = app.payload(dep, image, body);
        p["fixed_host_port"] = json!(fixed);
        p
    };
    let (port, _) = app.deploy_ok(&payload("dep-x1", APP, "first"));
    assert_eq!(port, fixed);
    assert!(body(fixed).contains("body=first"));
    // The old container is stopped to free the port; the failure restarts it.
    let r = app.deploy(&payload("dep-x2", CRASH, "x"));
    assert_eq!(r.report["status"], "failed", "{r:?}");
    assert!(r.log.contains("to free fixed host port"), "{}", r.log);
    assert!(body(fixed).contains("body=first"));
    let (port, _) = app.deploy_ok(&payload("dep-x3", APP, "second"));
    assert_eq!(port, fixed);
    assert!(body(fixed).contains("body=second"));
    assert_eq!(containers(&app.prefix), vec![app.container()]);
}

#[test]
fn interrupted_replacement_is_recovered_and_cleanup_removes_everything() {
    if !require_docker(test_name!()) {
        return;
    }
    images();
    let app = App::new("itd-clean");
    std::fs::create_dir_all(app.share.join("d")).unwrap();
    std::fs::write(app.share.join("d/file.txt"), "x").unwrap();
    let mut p = app.payload("dep-c1", APP, "one");
    p["datasets"] = json!([{"id": uniq("ds"), "name": "d", "nfs_path": "d", "version": 1, "mount_mode": "dependency"}]);
    let (port1, _) = app.deploy_ok(&p);

    // As if the agent died right after renaming the old container aside.
    let aside = format!("{}-old-0123456789ab", app.container());
    docker_ok(&["rename", &app.container(), &aside]);
    p["deployment_id"] = json!("dep-c2");
    p["env_vars"]["BODY"] = json!("two");
    let (port2, r) = app.deploy_ok(&p);
    assert!(r.log.contains("interrupted deploy"), "{}", r.log);
    assert!(body(port2).contains("body=two"));
    assert!(util::http_get(port1, "/").is_none());
    assert_eq!(containers(&app.prefix), vec![app.container()]);

    // A leftover of ours, and another app's container whose name merely looks like one.
    let leftover = format!("{}-old-feedfacecafe", app.container());
    docker_ok(&[
        "run",
        "-d",
        "--name",
        &leftover,
        "--label",
        &format!("muvee.domain_prefix={}", app.prefix),
        &util::base_image(),
        "sleep",
        "600",
    ]);
    let decoy = format!("{}-old-decoy", app.container());
    docker_ok(&[
        "run",
        "-d",
        "--name",
        &decoy,
        "--label",
        &format!("muvee.domain_prefix={}-old-decoy", app.prefix),
        &util::base_image(),
        "sleep",
        "600",
    ]);
    // The Go agent labels nothing: its app `<prefix>-old-v2` is not our leftover either.
    let go_app = format!("{}-old-v2", app.container());
    docker_ok(&[
        "run",
        "-d",
        "--name",
        &go_app,
        &util::base_image(),
        "sleep",
        "600",
    ]);
    let (port3, _) = app.deploy_ok(&p);
    assert!(body(port3).contains("body=two"));
    let task = json!({"ID": "cleanup-1", "Type": "cleanup", "DeploymentID": "dep-c2",
        "Payload": {"domain_prefix": app.prefix}});
    let r = app.run(None, &task);
    assert_eq!(r.report, json!({"status": "completed"}), "{r:?}");
    let mut left = containers(&app.prefix);
    left.sort();
    assert_eq!(left, vec![decoy.clone(), go_app.clone()]);
    assert!(!app.data.join("mounts/dep-c2").exists());
    assert!(!app.data.join("mounts/dep-c1").exists());
    // Cleaning up again (nothing left) is still success.
    let r = app.run(None, &task);
    assert_eq!(r.report, json!({"status": "completed"}), "{r:?}");
}

#[test]
fn dataset_cache_evicts_lru_but_never_a_mounted_version() {
    if !require_docker(test_name!()) {
        return;
    }
    images();
    let mut app = App::new("itd-evict");
    app.set("DEPLOY_DRAIN", "0s");
    app.set("MAX_STORAGE", &(500 * 1024).to_string());
    let ids: Vec<String> = ["a", "b", "c"]
        .iter()
        .map(|n| uniq(&format!("ev{n}")))
        .collect();
    for (i, id) in ids.iter().enumerate() {
        std::fs::create_dir_all(app.share.join(id)).unwrap();
        std::fs::write(app.share.join(id).join("file.txt"), format!("set-{i}\n")).unwrap();
        std::fs::write(app.share.join(id).join("blob"), vec![7u8; 200 * 1024]).unwrap();
    }
    let deploy = |app: &App, n: usize, id: &str| {
        let mut p = app.payload(&format!("dep-e{n}"), APP, "e");
        p["datasets"] = json!([{"id": id, "name": "set", "nfs_path": id, "version": 1, "mount_mode": "dependency"}]);
        app.deploy_ok(&p)
    };
    let objects = app.data.join("objects");
    let cached = |id: &str| objects.join(id).join("v1").is_dir();
    let cache_bytes = || dir_bytes(&objects);

    deploy(&app, 1, &ids[0]);
    deploy(&app, 2, &ids[1]);
    assert!(cached(&ids[0]) && cached(&ids[1]));
    // 3 × 200 KiB > 500 KiB: the least recently used version that nothing mounts goes.
    let (_, r) = deploy(&app, 3, &ids[2]);
    assert!(r.log.contains("evicted"), "{}", r.log);
    assert!(!cached(&ids[0]) && cached(&ids[1]) && cached(&ids[2]));
    assert!(cache_bytes() <= 500 * 1024);

    // A budget below what the running container mounts: the unused version goes, the
    // mounted one stays (over budget) and the app still reads it.
    app.set("MAX_STORAGE", &(100 * 1024).to_string());
    let (port, _) = deploy(&app, 4, &ids[2]);
    assert!(!cached(&ids[1]) && cached(&ids[2]));
    assert!(body(port).contains("set-2"));
    assert_eq!(
        docker_ok(&["exec", &app.container(), "cat", "/data/set/file.txt"]),
        "set-2\n"
    );
}

/// A version counts as cached only when complete (its marker is written last): a copy
/// half-deleted by a killed eviction is copied again, and a complete one serves without
/// its NFS source.
#[test]
fn a_cached_dataset_needs_no_source_and_an_incomplete_copy_is_never_mounted() {
    if !require_docker(test_name!()) {
        return;
    }
    images();
    let mut app = App::new("itd-cache");
    app.set("DEPLOY_DRAIN", "0s");
    let id = uniq("dsc");
    let src = app.share.join("c");
    std::fs::create_dir_all(&src).unwrap();
    for i in 0..200 {
        std::fs::write(src.join(format!("f{i}")), format!("{i}\n")).unwrap();
    }
    std::fs::write(src.join("file.txt"), "complete-set\n").unwrap();
    let mut p = app.payload("dep-k1", APP, "k");
    p["datasets"] = json!([{"id": id, "name": "set", "nfs_path": "c", "version": 1, "mount_mode": "dependency"}]);
    app.deploy_ok(&p);
    let objects = app.data.join("objects").join(&id);
    let mounted = |app: &App| {
        let ls = docker_ok(&["exec", &app.container(), "ls", "/data/set"]);
        ls.lines().count()
    };
    assert_eq!(mounted(&app), 201);

    // As if an eviction was killed half-way after taking the marker.
    std::fs::remove_file(objects.join("v1.complete")).unwrap();
    for i in 0..100 {
        std::fs::remove_file(objects.join("v1").join(format!("f{i}"))).unwrap();
    }
    p["deployment_id"] = json!("dep-k2");
    let (_, r) = app.deploy_ok(&p);
    assert!(r.log.contains("copying version 1"), "{}", r.log);
    assert_eq!(mounted(&app), 201);

    // The share is unreachable: the cached version deploys as it is.
    std::fs::remove_dir_all(&src).unwrap();
    p["deployment_id"] = json!("dep-k3");
    let (port, r) = app.deploy_ok(&p);
    assert!(r.log.contains("version 1 is cached"), "{}", r.log);
    assert!(body(port).contains("complete-set"));
    assert_eq!(mounted(&app), 201);
}

/// A new version differing in two files (one with the same size and mtime as before) takes
/// hard links to the cached one for the rest: the copy and the disk space are those files'; the cache budget counts shared files once;
/// evicting the old version leaves the new one whole.
#[test]
fn a_new_dataset_version_links_unchanged_files_to_the_cached_one() {
    if !require_docker("a_new_dataset_version_links_unchanged_files_to_the_cached_one") {
        return;
    }
    images();
    let mut app = App::new("itd-link");
    app.set("DEPLOY_DRAIN", "0s");
    let id = uniq("dsl");
    let src = app.share.join("l");
    std::fs::create_dir_all(&src).unwrap();
    for i in 0..100 {
        std::fs::write(src.join(format!("f{i}")), vec![i as u8; 20 * 1024]).unwrap();
    }
    std::fs::write(src.join("file.txt"), "version-1\n").unwrap();
    // Rewritten below with the same size and mtime: rsync's quick check would link it.
    let same = src.join("same.txt");
    let mtime = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
    let write_same = |text: &str| {
        std::fs::write(&same, text).unwrap();
        let f = std::fs::File::options().write(true).open(&same).unwrap();
        f.set_modified(mtime).unwrap();
    };
    write_same("version-1\n");
    let deploy = |app: &App, dep: &str, version: u64| {
        let mut p = app.payload(dep, APP, "l");
        p["datasets"] = json!([{"id": id, "name": "set", "nfs_path": "l", "version": version, "mount_mode": "dependency"}]);
        app.deploy_ok(&p)
    };
    let objects = app.data.join("objects").join(&id);
    deploy(&app, "dep-l1", 1);
    let v1 = disk_bytes(&[&objects.join("v1")]);
    assert!(v1 > 100 * 20 * 1024, "{v1}");
    // Version 2: one file differs. The budget holds v1 and v2 only if shared files count once.
    std::fs::write(src.join("file.txt"), "version-2, a little longer\n").unwrap();
    write_same("version-2\n");
    app.set("MAX_STORAGE", &(v1 + v1 / 20).to_string());
    let (port, r) = deploy(&app, "dep-l2", 2);
    assert!(
        r.log.contains("unchanged since version 1 are linked"),
        "{}",
        r.log
    );
    assert!(r.log.contains(" bytes, 37 of them copied"), "{}", r.log);
    assert!(body(port).contains("version-2"));
    let seen = docker_ok(&["exec", &app.container(), "cat", "/data/set/same.txt"]);
    assert_eq!(seen.trim(), "version-2");
    let ino = |p: PathBuf| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap());
    assert_eq!(ino(objects.join("v1/f7")), ino(objects.join("v2/f7")));
    let both = disk_bytes(&[&objects.join("v1"), &objects.join("v2")]);
    assert!(both <= v1 + v1 / 20, "{both} > {v1} + 5%");
    assert!(objects.join("v1.complete").is_file(), "evicted: {}", r.log);
    // Below both: v1 (mounted by nothing now) goes, v2 stays whole.
    app.set("MAX_STORAGE", &(v1 - 1).to_string());
    let (port, r) = deploy(&app, "dep-l3", 2);
    assert!(r.log.contains("version 2 is cached"), "{}", r.log);
    assert!(!objects.join("v1").exists() && objects.join("v2.complete").is_file());
    assert!(body(port).contains("version-2"));
    let ls = docker_ok(&["exec", &app.container(), "ls", "/data/set"]);
    assert_eq!(ls.lines().count(), 102, "{ls}");
    let f7 = docker_ok(&["exec", &app.container(), "md5sum", "/data/set/f7"]);
    let want = util::sh(Command::new("md5sum").arg(src.join("f7")));
    assert_eq!(f7.split(' ').next(), want.split(' ').next());
}

/// Bytes of the files under `roots`, each inode once (as `du` counts them).
fn disk_bytes(roots: &[&Path]) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut seen = std::collections::HashSet::new();
    let mut stack: Vec<PathBuf> = roots.iter().map(|p| p.to_path_buf()).collect();
    let mut total = 0;
    while let Some(p) = stack.pop() {
        let md = std::fs::symlink_metadata(&p).unwrap();
        if md.is_dir() {
            stack.extend(std::fs::read_dir(&p).unwrap().flatten().map(|e| e.path()));
        } else if seen.insert((md.dev(), md.ino())) {
            total += md.len();
        }
    }
    total
}

/// rsync writes without fsync: the copy's data reaches the disk (syncfs on its filesystem)
/// before the completion marker is created, so a power loss cannot leave a version marked
/// complete with missing data. Seen with strace around a real deploy.
#[test]
fn a_dataset_copy_is_on_disk_before_its_completion_marker() {
    let test = "a_dataset_copy_is_on_disk_before_its_completion_marker";
    if !require_docker(test) {
        return;
    }
    if Command::new("strace").arg("-V").output().is_err() {
        assert!(
            std::env::var("MUVEE_REQUIRE_DOCKER").as_deref() != Ok("1"),
            "{test}: strace is missing (scripts/testbed.sh up installs it)"
        );
        eprintln!("SKIPPED {test}: no strace");
        return;
    }
    images();
    let mut app = App::new("itd-sync");
    app.set("DEPLOY_DRAIN", "0s");
    let trace = app.data.with_extension("strace");
    app.wrapper = [
        "strace",
        "-f",
        "-qq",
        "-e",
        "trace=syncfs,fsync,openat",
        "-o",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([trace.display().to_string()])
    .collect();
    let id = uniq("dss");
    let src = app.share.join("s");
    std::fs::create_dir_all(&src).unwrap();
    for i in 0..50 {
        std::fs::write(src.join(format!("f{i}")), format!("{i}\n")).unwrap();
    }
    let mut p = app.payload("dep-s1", APP, "s");
    p["datasets"] = json!([{"id": id, "name": "set", "nfs_path": "s", "version": 1, "mount_mode": "dependency"}]);
    app.deploy_ok(&p);
    let trace = std::fs::read_to_string(&trace).unwrap();
    let lines: Vec<&str> = trace.lines().collect();
    let marker = lines
        .iter()
        .position(|l| l.contains("/v1.complete\"") && l.contains("O_CREAT"))
        .expect("the marker was never created");
    let synced = lines.iter().position(|l| l.contains("syncfs("));
    assert!(
        synced.is_some_and(|s| s < marker),
        "no syncfs before the marker:\n{}",
        lines[marker.saturating_sub(5)..=marker].join("\n")
    );
}

fn dir_bytes(p: &Path) -> u64 {
    let Ok(md) = std::fs::symlink_metadata(p) else {
        return 0;
    };
    if !md.is_dir() {
        return md.len();
    }
    std::fs::read_dir(p)
        .unwrap()
        .flatten()
        .map(|e| dir_bytes(&e.path()))
        .sum()
}

/// Bad payloads fail naming the field, before any command runs: docker and rsync are
/// recording stand-ins, and their log must stay empty.
#[test]
fn invalid_payloads_fail_naming_the_field_before_any_command() {
    let mut app = App::new("itd-bad");
    let shims = temp_dir("deploy-shims");
    let calls = shims.join("calls.log");
    let rsync = shims.join("rsync");
    std::fs::write(&rsync, "#!/bin/sh\necho \"rsync $*\" >> \"$FAKE_LOG\"\n").unwrap();
    std::fs::set_permissions(&rsync, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let fake_docker = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bin/docker");
    app.set("DOCKER_CLI", fake_docker.to_str().unwrap());
    app.set("FAKE_LOG", calls.to_str().unwrap());
    let path = format!(
        "{}:{}",
        shims.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    app.set("PATH", &path);
    std::fs::create_dir_all(app.share.join("ok")).unwrap();
    let base = app.payload("dep-b1", APP, "x");
    let ds = |name: &str, id: &str, nfs: &str| json!([{"id": id, "name": name, "nfs_path": nfs, "version": 1, "mount_mode": "dependency"}]);
    let cases: Vec<(&str, Value, &str)> = vec![
        ("domain_prefix", json!("../etc"), "`domain_prefix`"),
        ("domain_prefix", json!("Bad_Prefix"), "`domain_prefix`"),
        ("image_tag", json!("--privileged"), "`image_tag`"),
        ("image_tag", json!("a b"), "`image_tag`"),
        ("container_port", json!(70000), "`container_port`"),
        ("container_port", json!("8080"), "`container_port`"),
        ("memory_limit", json!("lots"), "`memory_limit`"),
        ("volume_mount_path", json!("rel/dir"), "`volume_mount_path`"),
        (
            "volume_mount_path",
            json!("/a/../../etc"),
            "`volume_mount_path`",
        ),
        ("deployment_id", json!("../../x"), "`deployment_id`"),
        ("env_vars", json!({"A-B": "v"}), "`env_vars`"),
        ("env_vars", json!({"A": 1}), "`env_vars.A`"),
        (
            "datasets",
            ds("../../etc", "d1", "ok"),
            "`datasets[0].name`",
        ),
        ("datasets", ds("a/b", "d1", "ok"), "`datasets[0].name`"),
        ("datasets", ds("", "d1", "ok"), "`datasets[0].name`"),
        ("datasets", ds("n", "../../x", "ok"), "`datasets[0].id`"),
        (
            "datasets",
            ds("n", "d1", "../../etc"),
            "`datasets[0].nfs_path`",
        ),
        ("datasets", ds("n", "d1", "missing-dir"), "missing-dir"),
        ("datasets", json!("corpus"), "`datasets`"),
    ];
    for (field, value, expect) in cases {
        let mut p = base.clone();
        p[field] = value.clone();
        let r = app.deploy(&p);
        assert_eq!(r.report["status"], "failed", "{field}={value}: {r:?}");
        let why = r.report["result"].as_str().unwrap();
        assert!(why.contains(expect), "{field}={value}: {why}");
        assert!(
            !calls.exists(),
            "{field}={value}: commands ran: {}",
            std::fs::read_to_string(&calls).unwrap_or_default()
        );
    }
    // A relative nfs_path needs the base path from the config.
    let mut p = base.clone();
    p["datasets"] = ds("n", "d1", "ok");
    let out = util::run_task(
        &["--type", "deploy"],
        &p.to_string(),
        &[
            ("DATA_DIR", app.data.to_str().unwrap()),
            ("DOCKER_CLI", fake_docker.to_str().unwrap()),
            ("FAKE_LOG", calls.to_str().unwrap()),
            ("PATH", &path),
        ],
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        report,
        json!({"result": "dataset NFS base path is not configured", "status": "failed"})
    );
    assert!(!calls.exists());
    assert!(!app.data.join("objects").exists() && !app.data.join("mounts").exists());
    // Control: a valid payload does reach the stand-ins.
    let r = app.deploy(&base);
    assert_eq!(r.report["status"], "failed", "{r:?}");
    let log = std::fs::read_to_string(&calls).unwrap();
    assert!(log.starts_with("docker image inspect"), "{log}");
}

/// A child that prints far faster than the agent consumes (a `docker pull` stand-in
/// printing 300 MB) meets back-pressure: the agent's peak RSS stays under 64 MiB.
#[test]
fn a_flood_of_output_keeps_the_agent_under_64_mib() {
    let app = App::new("itd-flood");
    let docker = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/flood/docker");
    let hwm = app.data.join("hwm");
    let mut p = app.payload("dep-fl1", "muvee-it-deploy/flood:1", "x");
    p["memory_limit"] = json!("");
    let out = util::run_task(
        &["--type", "deploy"],
        &p.to_string(),
        &[
            ("DATA_DIR", app.data.to_str().unwrap()),
            ("DOCKER_CLI", docker.to_str().unwrap()),
            ("FLOOD_BYTES", "300000000"),
            ("FLOOD_HWM", hwm.to_str().unwrap()),
        ],
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["status"], "failed", "{}", util::describe(&out));
    let line = std::fs::read_to_string(&hwm).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    eprintln!("flood: peak RSS {kib} KiB");
    assert!(kib < 64 * 1024, "peak RSS {kib} KiB: {line}");
}
