//! Compose and image deploys (`mode:"compose"`) on a real engine with the host's compose CLI
//! (Debian's docker-compose v1 on the test bed): images come from the password-protected
//! test registry, the two-service project from a hosted git repo behind Basic auth.

use crate::deployer::{images, APP, IDLE};
use crate::git_http::{self, GitHttp};
use crate::util::{
    self, require_docker, temp_dir, test_name, unique_hex, ArgvSampler, RemoveContainers,
};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The fixture images in the test registry, and a DOCKER_CONFIG logged in to it.
struct Pushed {
    app: String,
    idle: String,
    login: PathBuf,
}

fn pushed() -> &'static Pushed {
    static P: OnceLock<Pushed> = OnceLock::new();
    P.get_or_init(|| {
        images();
        let reg = util::registry();
        let login = util::registry_login();
        let env = [("DOCKER_CONFIG", login.to_str().unwrap())];
        let tag = |local: &str| {
            let remote = format!("{}/muvee-it-compose/{}", reg.addr, local.replace(':', "-"));
            util::sh(Command::new(util::docker_cli()).args(["tag", local, &remote]));
            util::sh(
                Command::new(util::docker_cli())
                    .envs(env)
                    .args(["push", "-q", &remote]),
            );
            remote
        };
        Pushed {
            app: tag(APP),
            idle: tag(IDLE),
            login,
        }
    })
}

fn have_compose() -> bool {
    let ok = |c: &mut Command| c.output().is_ok_and(|o| o.status.success());
    ok(Command::new(util::docker_cli()).args(["compose", "version"]))
        || ok(Command::new("docker-compose").arg("version"))
}

fn require(test: &str) -> bool {
    if !require_docker(test) {
        return false;
    }
    if !have_compose() {
        let msg =
            "neither `docker compose` nor `docker-compose` (scripts/testbed.sh up installs it)";
        if std::env::var("MUVEE_REQUIRE_DOCKER").as_deref() == Ok("1") {
            panic!("{test}: MUVEE_REQUIRE_DOCKER=1 but {msg}");
        }
        eprintln!("SKIPPED {test}: {msg}");
        return false;
    }
    true
}

/// One compose app: its prefix, DATA_DIR, and a guard removing its project's objects.
struct App {
    prefix: String,
    data: PathBuf,
    volumes: PathBuf,
    _cleanup: RemoveContainers,
}

impl App {
    fn new() -> App {
        let prefix = format!("itc-{}-{}", std::process::id(), &unique_hex()[..8]);
        let project = format!("com.docker.compose.project=muvee-{prefix}");
        App {
            _cleanup: RemoveContainers::labelled(&project),
            prefix,
            data: temp_dir("compose-data"),
            volumes: temp_dir("compose-vol"),
        }
    }

    fn project(&self) -> String {
        format!("muvee-{}", self.prefix)
    }

    fn run(&self, kind: &str, payload: &Value, env: &[(&str, &str)]) -> (Value, String) {
        let mut e = vec![("DATA_DIR", self.data.to_str().unwrap())];
        e.extend_from_slice(env);
        let vols = self.volumes.to_str().unwrap();
        let args = ["--type", kind, "--volume-nfs-base-path", vols];
        let out = util::run_task(&args, &payload.to_string(), &e);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let report: Value = serde_json::from_str(stdout.trim())
            .unwrap_or_else(|_| panic!("no report: {}", util::describe(&out)));
        (report, String::from_utf8_lossy(&out.stderr).into_owned())
    }

    /// Objects (containers, networks, volumes) labelled with the project.
    fn objects(&self) -> Vec<String> {
        let filter = format!("label=com.docker.compose.project={}", self.project());
        let mut all = Vec::new();
        for what in [
            &["ps", "-aq"][..],
            &["network", "ls", "-q"],
            &["volume", "ls", "-q"],
        ] {
            let mut args = what.to_vec();
            args.extend(["--filter", &filter]);
            let out = util::docker(&args, &[]);
            all.extend(
                String::from_utf8_lossy(&out.stdout)
                    .split_whitespace()
                    .map(String::from),
            );
        }
        all
    }

    fn container(&self, service: &str) -> String {
        let filter = format!("label=com.docker.compose.service={service}");
        let project = format!("label=com.docker.compose.project={}", self.project());
        let out = util::docker(
            &["ps", "-q", "--filter", &project, "--filter", &filter],
            &[],
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn cleanup(&self) -> Value {
        let p = json!({"mode": "compose", "project_id": "p", "domain_prefix": self.prefix});
        self.run("cleanup", &p, &[]).0
    }
}

fn env_of(container: &str) -> Vec<String> {
    let out = util::docker(
        &["inspect", "--format", "{{json .Config.Env}}", container],
        &[],
    );
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

fn assert_clean(app: &App) {
    let r = app.cleanup();
    assert_eq!(r["status"], "completed", "{r}");
    assert!(app.objects().is_empty(), "left: {:?}", app.objects());
    assert!(!app.data.join(format!("compose/{}", app.prefix)).exists());
}

fn no_secret_anywhere(argvs: &[String], log: &str, data: &Path, secrets: &[&str]) {
    for s in secrets {
        for a in argvs {
            assert!(!a.contains(s), "argv: {a}");
        }
        assert!(!log.contains(s), "log: {log}");
        assert!(util::files_containing(data, s).is_empty(), "file with {s}");
    }
}

#[test]
fn image_project_from_inline_yaml_serves_with_env_intact_and_cleans_up() {
    if !require(test_name!()) {
        return;
    }
    let img = pushed();
    let app = App::new();
    let yaml = format!(
        "services:\n  app:\n    image: {}\n    restart: unless-stopped\n    env_file:\n      - .env\n",
        img.app
    );
    let body = format!(
        "multi\nline 'single' \"double\" # not a comment \\ {}",
        unique_hex()
    );
    let p = json!({"mode": "compose", "deployment_id": "dep-c1", "project_id": "p-img",
                   "domain_prefix": app.prefix, "inline_compose_yaml": yaml,
                   "expose_service": "app", "expose_port": 8080, "memory_limit": "64m",
                   "volume_mount_path": "/workspace",
                   "env_vars": {"BODY": body, "PLAIN": "x"}});
    let sampler = ArgvSampler::start();
    // The node's own login (its DOCKER_CONFIG) pulls: image projects carry no registry_auths.
    let (r, log) = app.run(
        "deploy",
        &p,
        &[("DOCKER_CONFIG", img.login.to_str().unwrap())],
    );
    let argvs = sampler.finish();
    assert_eq!(r["status"], "completed", "{r}\n{log}");
    let port = r["host_port"].as_u64().unwrap() as u16;
    let page = util::http_get(port, "/").unwrap();
    assert!(page.starts_with(&format!("body={body}")), "{page}");
    let c = app.container("app");
    let env = env_of(&c);
    assert!(env.contains(&format!("BODY={body}")), "{env:?}");
    assert!(env.contains(&"PLAIN=x".to_string()), "{env:?}");
    let labels = util::docker(
        &[
            "inspect",
            "--format",
            "{{index .Config.Labels \"muvee.domain_prefix\"}} {{.HostConfig.Memory}}",
            &c,
        ],
        &[],
    );
    assert_eq!(
        String::from_utf8_lossy(&labels.stdout).trim(),
        format!("{} {}", app.prefix, 64 << 20)
    );
    // The workspace volume: the project's dir under VOLUME_NFS_BASE_PATH.
    util::sh(Command::new(util::docker_cli()).args([
        "exec",
        &c,
        "sh",
        "-c",
        "echo ws > /workspace/w.txt",
    ]));
    assert!(app.volumes.join("p-img/w.txt").is_file());
    no_secret_anywhere(&argvs, &log, &app.data, &[&body[..20]]);
    assert!(argvs
        .iter()
        .any(|a| a.contains("docker-compose") || a.contains(" compose ")));
    assert_clean(&app);
    // Cleanup again, with nothing left: still success.
    assert_eq!(app.cleanup()["status"], "completed");
}

#[test]
fn two_service_project_from_hosted_git_with_registry_auths() {
    if !require(test_name!()) {
        return;
    }
    let img = pushed();
    let app = App::new();
    let project = util::new_uuid();
    let root = temp_dir("compose-git");
    let compose = format!(
        "services:\n  web:\n    image: {}\n    environment:\n      BODY: from-compose-file\n    depends_on:\n      - side\n  side:\n    image: {}\n    volumes:\n      - scratch:/scratch\nvolumes:\n  scratch: {{}}\n",
        img.app, img.idle
    );
    git_http::make_repo(
        &root.join(format!("git/{project}.git")),
        "main",
        &[("deploy/compose.yml", &compose)],
        &[],
    );
    let secret = format!("agent-secret-{}", unique_hex());
    let server = GitHttp::start(&root, "agent", &secret);
    let reg = util::registry();
    let p = json!({"mode": "compose", "deployment_id": "dep-c2", "project_id": project,
                   "domain_prefix": app.prefix, "git_url": format!("/git/{project}.git"),
                   "git_branch": "main", "compose_file_path": "deploy/compose.yml",
                   "expose_service": "web", "expose_port": 8080, "memory_limit": "",
                   "env_vars": {}, "git_username": "agent", "git_token": secret,
                   "registry_auths": [{"addr": reg.addr, "username": reg.user, "password": reg.password}]});
    let sampler = ArgvSampler::start();
    // A fresh DOCKER_CONFIG (run_task's default): only registry_auths can pull.
    let (r, log) = app.run("deploy", &p, &[("CONTROL_PLANE_URL", &server.url())]);
    let argvs = sampler.finish();
    assert_eq!(r["status"], "completed", "{r}\n{log}");
    let port = r["host_port"].as_u64().unwrap() as u16;
    assert!(util::http_get(port, "/")
        .unwrap()
        .contains("body=from-compose-file"));
    assert!(!app.container("side").is_empty());
    assert!(!server.requests().is_empty());
    no_secret_anywhere(&argvs, &log, &app.data, &[&secret, &reg.password]);
    // Objects: 2 containers, the default network, the named volume.
    assert!(app.objects().len() >= 4, "{:?}", app.objects());
    // Cleanup must work when the work dir is gone.
    std::fs::remove_dir_all(app.data.join("compose")).unwrap();
    assert_clean(&app);
}

/// A TCP listener that counts connections and closes each at once.
fn counting_listener() -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let h = hits.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            drop(s);
        }
    });
    (port, hits)
}

#[test]
fn env_values_reach_the_app_but_never_configure_the_compose_cli() {
    if !require("env_values_reach_the_app_but_never_configure_the_compose_cli") {
        return;
    }
    let img = pushed();
    let app = App::new();
    // Where the compose CLI would send every API call (the pull's registry login too) if it
    // read the app's env as its own settings.
    let (port, hits) = counting_listener();
    let docker_host = format!("tcp://127.0.0.1:{port}");
    let yaml = format!(
        "services:\n  app:\n    image: {}\n    restart: unless-stopped\n    env_file:\n      - .env\n",
        img.app
    );
    let p = json!({"mode": "compose", "deployment_id": "dep-c3", "project_id": "p-env",
                   "domain_prefix": app.prefix, "inline_compose_yaml": yaml,
                   "expose_service": "app", "expose_port": 8080,
                   "env_vars": {"DOCKER_HOST": docker_host, "COMPOSE_PROJECT_NAME": "other",
                                "COMPOSE_IGNORE_ORPHANS": "1"}});
    let (r, log) = app.run(
        "deploy",
        &p,
        &[("DOCKER_CONFIG", img.login.to_str().unwrap())],
    );
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 0, "{log}");
    assert_eq!(r["status"], "completed", "{r}\n{log}");
    let env = env_of(&app.container("app"));
    assert!(
        env.contains(&format!("DOCKER_HOST={docker_host}")),
        "{env:?}"
    );
    assert!(
        env.contains(&"COMPOSE_PROJECT_NAME=other".to_string()),
        "{env:?}"
    );
    assert_clean(&app);
}

fn containers_of(app: &App) -> Vec<String> {
    let filter = format!("label=com.docker.compose.project={}", app.project());
    let out = util::docker(&["ps", "-aq", "--filter", &filter], &[]);
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(String::from)
        .collect()
}

#[test]
fn the_compose_policy_refuses_what_would_own_the_host_unless_turned_off() {
    if !require("the_compose_policy_refuses_what_would_own_the_host_unless_turned_off") {
        return;
    }
    let img = pushed();
    let app = App::new();
    let login = [("DOCKER_CONFIG", img.login.to_str().unwrap())];
    // Privileged through an anchor: only the engine's view of the container shows it.
    let yaml = format!(
        "x-root: &root\n  privileged: true\n  cap_add: [SYS_ADMIN]\nservices:\n  app:\n    image: {app}\n    volumes:\n      - ./conf:/conf:ro\n  side:\n    <<: *root\n    image: {idle}\n    pid: host\n    devices:\n      - /dev/null:/dev/host-null\n    volumes:\n      - /:/host\n      - /var/run/docker.sock:/var/run/docker.sock\n",
        app = img.app,
        idle = img.idle
    );
    let p = json!({"mode": "compose", "deployment_id": "dep-c4", "project_id": "p-pol",
                   "domain_prefix": app.prefix, "inline_compose_yaml": yaml,
                   "expose_service": "app", "expose_port": 8080, "volume_mount_path": "/ws"});
    let (r, log) = app.run("deploy", &p, &login);
    assert_eq!(r["status"], "failed", "{r}\n{log}");
    let why = r["result"].as_str().unwrap();
    for part in [
        "breaks the compose policy (DEPLOY_COMPOSE_POLICY=baseline), nothing was started",
        "service side: `privileged` is true",
        "service side: `cap_add` adds SYS_ADMIN",
        "service side: `pid` is \"host\"",
        "service side: `devices` maps /dev/null",
        "service side: `volumes` mounts host path /,",
        "service side: `volumes` mounts host path /var/run/docker.sock,",
    ] {
        assert!(why.contains(part), "{part:?} missing: {why}");
    }
    // The project's own files and the workspace are the app's to mount.
    assert!(!why.contains("service app"), "{why}");
    assert!(containers_of(&app).is_empty(), "{:?}", containers_of(&app));

    // A trusted installation turns the policy off: a host path outside the app's dirs (the
    // test bed's engine cannot run privileged containers) is mounted as written.
    let host = temp_dir("compose-host");
    let marker = unique_hex();
    std::fs::write(host.join("marker"), &marker).unwrap();
    let yaml = format!(
        "services:\n  app:\n    image: {}\n  side:\n    image: {}\n    volumes:\n      - {}:/host:ro\n",
        img.app,
        img.idle,
        host.display()
    );
    let p = json!({"mode": "compose", "deployment_id": "dep-c5", "project_id": "p-pol",
                   "domain_prefix": app.prefix, "inline_compose_yaml": yaml,
                   "expose_service": "app", "expose_port": 8080});
    let mut env = login.to_vec();
    env.push(("DEPLOY_COMPOSE_POLICY", "off"));
    let (r, log) = app.run("deploy", &p, &env);
    assert_eq!(r["status"], "completed", "{r}\n{log}");
    let side = app.container("side");
    let out = util::docker(&["exec", &side, "cat", "/host/marker"], &[]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), marker);
    assert_clean(&app);
}

/// An inline-YAML deploy of `app`, its workspace at `/ws`.
fn inline(app: &App, project_id: &str, yaml: &str) -> Value {
    json!({"mode": "compose", "deployment_id": "dep-pol", "project_id": project_id,
           "domain_prefix": app.prefix, "inline_compose_yaml": yaml,
           "expose_service": "app", "expose_port": 8080, "volume_mount_path": "/ws"})
}

/// Deploys `p`, which the policy must refuse with nothing left running; returns the reason.
fn refused(app: &App, p: &Value, env: &[(&str, &str)]) -> String {
    let (r, log) = app.run("deploy", p, env);
    assert_eq!(r["status"], "failed", "{r}\n{log}");
    let why = r["result"].as_str().unwrap().to_string();
    assert!(
        why.contains("breaks the compose policy (DEPLOY_COMPOSE_POLICY=baseline)"),
        "{why}"
    );
    let running = util::docker(
        &[
            "ps",
            "-q",
            "--filter",
            &format!("label=com.docker.compose.project={}", app.project()),
        ],
        &[],
    );
    assert!(running.stdout.is_empty(), "{why}");
    why
}

fn contains_all(why: &str, parts: &[String]) {
    for part in parts {
        assert!(why.contains(part.as_str()), "{part:?} missing: {why}");
    }
}

#[test]
fn volume_driver_options_that_bind_a_host_path_are_refused() {
    if !require(test_name!()) {
        return;
    }
    let img = pushed();
    let app = App::new();
    let login = [("DOCKER_CONFIG", img.login.to_str().unwrap())];
    // docker's local driver makes `o: bind` a bind of `device`, whatever the type says.
    let yaml = format!(
        "services:\n  app:\n    image: {}\n    volumes:\n      - hostroot:/host\nvolumes:\n  hostroot:\n    driver_opts:\n      type: tmpfs\n      device: /\n      o: bind\n",
        img.app
    );
    let why = refused(&app, &inline(&app, "p-vol", &yaml), &login);
    contains_all(
        &why,
        &[format!(
            "service app: `volumes` volume {}_hostroot mounts host path /, outside",
            app.project()
        )],
    );
    // A bind volume over the app's own workspace and a sized tmpfs are the app's.
    let ws = app.volumes.join("p-vol");
    std::fs::create_dir_all(&ws).unwrap();
    let marker = unique_hex();
    std::fs::write(ws.join("marker"), &marker).unwrap();
    let yaml = format!(
        "services:\n  app:\n    image: {}\n    volumes:\n      - wsdata:/data\n      - scratch:/scratch\nvolumes:\n  wsdata:\n    driver_opts: {{type: none, device: {}, o: bind}}\n  scratch:\n    driver_opts: {{type: tmpfs, device: tmpfs, o: \"size=1m\"}}\n",
        img.app,
        ws.display()
    );
    let (r, log) = app.run("deploy", &inline(&app, "p-vol", &yaml), &login);
    assert_eq!(r["status"], "completed", "{r}\n{log}");
    let out = util::docker(&["exec", &app.container("app"), "cat", "/data/marker"], &[]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), marker);
    assert_clean(&app);
}

#[test]
fn files_the_compose_cli_would_read_on_the_host_are_refused_by_service_and_key() {
    if !require(test_name!()) {
        return;
    }
    let img = pushed();
    let app = App::new();
    let login = [("DOCKER_CONFIG", img.login.to_str().unwrap())];
    let host = temp_dir("compose-hostfiles");
    let secret = format!("HOST_SECRET={}", unique_hex());
    let (env, ext, allow) = (
        host.join("agent.env"),
        host.join("base.yml"),
        host.join("allow.json"),
    );
    std::fs::write(&env, &secret).unwrap();
    std::fs::write(&ext, "services:\n  b:\n    privileged: true\n").unwrap();
    std::fs::write(&allow, "{\"defaultAction\":\"SCMP_ACT_ALLOW\"}").unwrap();
    let yaml = format!(
        "services:\n  app:\n    image: {app}\n    env_file: [{env}]\n    secrets: [s]\n    security_opt: [\"seccomp={allow}\"]\n  side:\n    image: {idle}\n    extends: {{file: {ext}, service: b}}\nsecrets:\n  s:\n    file: {env}\nconfigs:\n  c:\n    file: {env}\n",
        app = img.app,
        idle = img.idle,
        env = env.display(),
        ext = ext.display(),
        allow = allow.display()
    );
    let why = refused(&app, &inline(&app, "p-files", &yaml), &login);
    let outside = |key: &str, p: &Path| {
        format!(
            "`{key}` reads host file {}, outside the project's files",
            p.display()
        )
    };
    contains_all(
        &why,
        &[
            format!("service app: {}", outside("env_file", &env)),
            format!(
                "service app: `security_opt` sets seccomp profile {}; only docker's default is allowed",
                allow.display()
            ),
            format!("service side: {}", outside("extends", &ext)),
            format!("service app: `secrets` s reads host file {}", env.display()),
            format!("top-level `configs` c reads host file {}", env.display()),
        ],
    );
    assert!(
        !why.contains(&secret) && !why.contains("`volumes`"),
        "{why}"
    );
    // Refused before any compose call: nothing was created.
    assert!(app.objects().is_empty(), "{:?}", app.objects());
    assert_clean(&app);
}

#[test]
fn a_mount_under_a_dir_the_app_writes_is_refused_and_a_failed_deploy_leaves_nothing_running() {
    if !require(test_name!()) {
        return;
    }
    let img = pushed();
    let app = App::new();
    let login = [("DOCKER_CONFIG", img.login.to_str().unwrap())];
    // The app could replace ./hostroot with a symlink to / through /repo; a restart would
    // then bind the host's root.
    let yaml = format!(
        "services:\n  app:\n    image: {}\n    restart: always\n    volumes:\n      - ./:/repo\n      - ./hostroot:/host\n  side:\n    image: {}\n    volumes:\n      - /ws-sub:/x\n",
        img.app, img.idle
    );
    let yaml = yaml.replace(
        "/ws-sub",
        &app.volumes.join("p-rw/sub").display().to_string(),
    );
    let why = refused(&app, &inline(&app, "p-rw", &yaml), &login);
    let src = app.data.join(format!("compose/{}/src", app.prefix));
    let real = |p: &Path| std::fs::canonicalize(p).unwrap().display().to_string();
    contains_all(
        &why,
        &[
            format!(
                "service app: `volumes` mounts host path {}/hostroot, inside {} which the app can write",
                src.display(),
                real(&src)
            ),
            format!(
                "service side: `volumes` mounts host path {}/sub, inside {} which the app can write",
                app.volumes.join("p-rw").display(),
                real(&app.volumes.join("p-rw"))
            ),
        ],
    );
    // A deploy that fails its health check takes down what it started.
    let yaml = format!(
        "services:\n  app:\n    image: {}\n    restart: always\n",
        img.idle
    );
    let mut env = login.to_vec();
    env.push(("DEPLOY_HEALTH_TIMEOUT", "3s"));
    let (r, log) = app.run("deploy", &inline(&app, "p-rw", &yaml), &env);
    assert_eq!(r["status"], "failed", "{r}\n{log}");
    assert!(containers_of(&app).is_empty(), "{:?}", containers_of(&app));
    assert_clean(&app);
}

#[test]
fn an_extends_file_the_app_can_write_is_refused() {
    if !require(test_name!()) {
        return;
    }
    let img = pushed();
    let app = App::new();
    let login = [("DOCKER_CONFIG", img.login.to_str().unwrap())];
    // The workspace is the app's: it could swap this file between two compose runs.
    let ws = app.volumes.join("p-toc");
    std::fs::create_dir_all(&ws).unwrap();
    let base = ws.join("base.yml");
    std::fs::write(
        &base,
        format!("services:\n  app:\n    image: {}\n", img.app),
    )
    .unwrap();
    let yaml = format!(
        "services:\n  app:\n    extends:\n      file: {}\n      service: app\n",
        base.display()
    );
    let why = refused(&app, &inline(&app, "p-toc", &yaml), &login);
    contains_all(
        &why,
        &[format!(
            "service app: `extends` reads host file {}, outside the project's files",
            base.display()
        )],
    );
    assert_clean(&app);
}

#[test]
fn another_projects_network_is_refused() {
    if !require(test_name!()) {
        return;
    }
    let img = pushed();
    let (victim, app) = (App::new(), App::new());
    let login = [("DOCKER_CONFIG", img.login.to_str().unwrap())];
    let yaml = format!("services:\n  app:\n    image: {}\n", img.app);
    let (r, log) = victim.run("deploy", &inline(&victim, "p-victim", &yaml), &login);
    assert_eq!(r["status"], "completed", "{r}\n{log}");
    let net = format!("{}_default", victim.project());
    let joined = format!(
        "services:\n  app:\n    image: {}\n    networks: [default, victim]\nnetworks:\n  victim:\n    external: true\n    name: {net}\n",
        img.app
    );
    let why = refused(&app, &inline(&app, "p-net", &joined), &login);
    contains_all(
        &why,
        &[format!(
            "service app: `networks` joins network {net}, which this project does not create"
        )],
    );
    // As `network_mode`, only the engine shows it.
    let mode = format!(
        "services:\n  app:\n    image: {}\n  side:\n    image: {}\n    network_mode: {net}\n",
        img.app, img.idle
    );
    let why = refused(&app, &inline(&app, "p-net", &mode), &login);
    contains_all(
        &why,
        &[format!(
            "service side: `network_mode` joins network {net}, not one of this project"
        )],
    );
    assert_clean(&app);
    assert_clean(&victim);
}

#[test]
fn a_repository_may_use_its_own_files_but_no_security_profile_of_its_own() {
    if !require(test_name!()) {
        return;
    }
    let img = pushed();
    let app = App::new();
    let project = util::new_uuid();
    let root = temp_dir("compose-git-policy");
    // Its own env file, extends file and second network are the app's; compose v1 connects
    // that network only when it starts the container.
    let good = format!(
        "services:\n  app:\n    extends: {{file: deploy/base.yml, service: web}}\n    env_file: [deploy/app.env]\n    networks: [default, back]\n  side:\n    image: {}\n    network_mode: bridge\nnetworks:\n  back: {{}}\n",
        img.idle
    );
    let base = format!("services:\n  web:\n    image: {}\n", img.app);
    let bad = format!(
        "services:\n  app:\n    image: {}\n    security_opt:\n      - apparmor=host-profile\n      - label=type:spc_t\n",
        img.app
    );
    let seccomp = format!(
        "services:\n  app:\n    image: {}\n    security_opt: [\"seccomp=deploy/allow.json\"]\n",
        img.app
    );
    git_http::make_repo(
        &root.join(format!("git/{project}.git")),
        "main",
        &[
            ("good.yml", &good),
            ("bad.yml", &bad),
            ("seccomp.yml", &seccomp),
            ("deploy/base.yml", &base),
            ("deploy/app.env", "BODY=from-env-file\n"),
            (
                "deploy/allow.json",
                "{\"defaultAction\":\"SCMP_ACT_ALLOW\"}",
            ),
        ],
        &[],
    );
    let secret = format!("agent-secret-{}", unique_hex());
    let server = GitHttp::start(&root, "agent", &secret);
    let payload = |file: &str| {
        json!({"mode": "compose", "deployment_id": "dep-c6", "project_id": project,
               "domain_prefix": app.prefix, "git_url": format!("/git/{project}.git"),
               "git_branch": "main", "compose_file_path": file, "expose_service": "app",
               "expose_port": 8080, "git_username": "agent", "git_token": secret})
    };
    let env = [
        ("CONTROL_PLANE_URL", server.url()),
        ("DOCKER_CONFIG", img.login.display().to_string()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let why = refused(&app, &payload("seccomp.yml"), &env);
    contains_all(
        &why,
        &["service app: `security_opt` sets seccomp profile deploy/allow.json; only docker's default is allowed".into()],
    );
    // Refused by the engine's view: a host AppArmor profile, a SELinux type of the host's.
    let why = refused(&app, &payload("bad.yml"), &env);
    contains_all(
        &why,
        &[
            "service app: `security_opt` sets apparmor=host-profile".into(),
            "service app: `security_opt` sets label=type:spc_t".into(),
        ],
    );
    let (r, log) = app.run("deploy", &payload("good.yml"), &env);
    assert_eq!(r["status"], "completed", "{r}\n{log}");
    let port = r["host_port"].as_u64().unwrap() as u16;
    let page = util::http_get(port, "/").unwrap();
    assert!(page.contains("body=from-env-file"), "{page}");
    let nets = util::docker(
        &[
            "inspect",
            "--format",
            "{{range $k, $v := .NetworkSettings.Networks}}{{$k}} {{end}}",
            &app.container("app"),
        ],
        &[],
    );
    let p = app.project();
    assert_eq!(
        String::from_utf8_lossy(&nets.stdout).trim(),
        format!("{p}_back {p}_default")
    );
    assert_clean(&app);
}

#[test]
fn only_the_agent_labels_services_and_it_labels_every_one_with_the_app_and_node() {
    if !require(test_name!()) {
        return;
    }
    let img = pushed();
    let app = App::new();
    let login = [("DOCKER_CONFIG", img.login.to_str().unwrap())];
    // Another tenant's services claiming the victim's app and this node (map and list forms).
    let yaml = format!(
        "services:\n  app:\n    image: {app}\n    labels:\n      muvee.domain_prefix: victim\n  side:\n    image: {idle}\n    labels: [\"muvee.node=node-lbl\", \"team=a\"]\n",
        app = img.app,
        idle = img.idle
    );
    let why = refused(&app, &inline(&app, "p-lbl", &yaml), &login);
    contains_all(
        &why,
        &[
            "service app: `labels` sets muvee.domain_prefix, a label only the agent sets".into(),
            "service side: `labels` sets muvee.node, a label only the agent sets".into(),
        ],
    );
    assert!(!why.contains("team"), "{why}");
    // With the policy off, our override still wins on every service.
    let mut env = login.to_vec();
    env.extend([("DEPLOY_COMPOSE_POLICY", "off"), ("NODE_NAME", "node-lbl")]);
    let yaml = yaml.replace("muvee.node=node-lbl", "muvee.node=elsewhere");
    let (r, log) = app.run("deploy", &inline(&app, "p-lbl", &yaml), &env);
    assert_eq!(r["status"], "completed", "{r}\n{log}");
    let labels = |c: &str| -> Value {
        let out = util::docker(&["inspect", "--format", "{{json .Config.Labels}}", c], &[]);
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let staged = app.data.join("compose").join(&app.prefix);
    for service in ["app", "side"] {
        let l = labels(&app.container(service));
        assert_eq!(
            l["muvee.domain_prefix"],
            app.prefix.as_str(),
            "{service}: {l}"
        );
        assert_eq!(l["muvee.node"], "node-lbl", "{service}: {l}");
        assert_eq!(l["muvee.managed"], "true", "{service}: {l}");
        let team = if service == "side" {
            json!("a")
        } else {
            Value::Null
        };
        assert_eq!(l["team"], team, "{service}: {l}");
        // The control channel's ownership rule relies on where compose ran.
        let dir = l["com.docker.compose.project.working_dir"]
            .as_str()
            .unwrap();
        let real = |p: &Path| std::fs::canonicalize(p).unwrap();
        assert!(real(Path::new(dir)).starts_with(real(&staged)), "{l}");
    }
    assert_eq!(labels(&app.container("app"))["muvee.expose_port"], "8080");
    assert_eq!(
        labels(&app.container("side"))["muvee.expose_port"],
        Value::Null
    );
    assert_clean(&app);
}
