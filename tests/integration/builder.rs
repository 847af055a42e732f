//! The builder role through `muvee-agent run-task --type build`: real git (file:// and smart
//! HTTP with Basic auth), the real Docker engine with both CLIs (a 28.x client without
//! buildx = legacy builder, Debian's 20.10 client = built-in BuildKit) and the
//! password-protected registry. PATH shims stand in where a test checks argv (buildx) or
//! proves that nothing ran. Every run gets its own DATA_DIR and DOCKER_CONFIG, so the
//! agent's own `docker login` is what lets the push through.

use crate::git_http::{self, GitHttp};
use crate::util::{self, new_uuid, temp_dir, test_name, unique_hex, ArgvSampler};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

mod caches;

fn dockerfile(body: &str) -> String {
    format!("FROM {}\n{body}\n", util::base_image())
}

fn payload(url: &str, branch: &str, project: &str) -> Value {
    json!({
        "git_url": url, "git_branch": branch, "dockerfile_path": "Dockerfile",
        "deployment_id": new_uuid(), "project_id": project, "domain_prefix": "app",
    })
}

fn file_url(p: &Path) -> String {
    format!("file://{}", p.display())
}

/// One `run-task --type build`.
struct Run {
    out: Output,
    data: PathBuf,
    dcfg: PathBuf,
    stderr: String,
    body: Value,
}

impl Run {
    fn status(&self) -> &str {
        self.body["status"].as_str().unwrap_or("")
    }
    fn result(&self) -> &str {
        self.body["result"].as_str().unwrap_or("")
    }
    fn tag(&self) -> &str {
        self.body["image_tag"].as_str().unwrap_or("")
    }
    fn dump(&self) -> String {
        util::describe(&self.out)
    }
    fn assert_completed(&self) {
        assert_eq!(self.status(), "completed", "{}", self.dump());
        assert_eq!(self.out.status.code(), Some(0));
    }
    fn assert_failed(&self) {
        assert_eq!(self.status(), "failed", "{}", self.dump());
        assert_eq!(self.out.status.code(), Some(1));
    }
    /// Nothing of any build (clone, key, secret files) is left in DATA_DIR.
    fn assert_no_build_dirs(&self) {
        let left: Vec<_> = std::fs::read_dir(self.data.join("builds"))
            .map(|rd| rd.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "left behind: {left:?}\n{}", self.dump());
    }
}

/// Runs a build. `login`: pass the test registry's credentials (flags + REGISTRY_PASSWORD),
/// so the agent logs in before building.
fn run_build(payload: &Value, env: &[(&str, &str)], login: bool) -> Run {
    run_build_in(&temp_dir("bdata"), payload, env, login)
}

/// [`run_build`] with a given DATA_DIR (builds that share the git cache).
fn run_build_in(data: &Path, payload: &Value, env: &[(&str, &str)], login: bool) -> Run {
    let reg = util::registry();
    let data = data.to_path_buf();
    let dcfg = temp_dir("bdcfg");
    let (d, c) = (data.display().to_string(), dcfg.display().to_string());
    let mut all: Vec<(&str, &str)> = vec![("DATA_DIR", &d), ("DOCKER_CONFIG", &c)];
    let mut args = vec!["--type", "build", "--registry-addr", &reg.addr];
    if login {
        args.extend(["--registry-user", &reg.user]);
        all.push(("REGISTRY_PASSWORD", &reg.password));
    }
    all.extend_from_slice(env);
    let out = util::run_task(&args, &payload.to_string(), &all);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let body = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    Run {
        out,
        data,
        dcfg,
        stderr,
        body,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Buildx,
    BuildKit,
    Legacy,
}

/// What a docker CLI really does (the same probe as the agent, done independently).
fn probe(cli: &str) -> Option<Kind> {
    let run = |args: &[&str], bk: bool| {
        let mut c = Command::new(cli);
        c.args(args).stdin(Stdio::null());
        if bk {
            c.env("DOCKER_BUILDKIT", "1");
        }
        c.output().ok()
    };
    run(&["version", "--format", "{{.Client.Version}}"], false).filter(|o| o.status.success())?;
    if run(&["buildx", "version"], false).is_some_and(|o| o.status.success()) {
        return Some(Kind::Buildx);
    }
    match run(&["build", "--help"], true) {
        Some(o)
            if o.status.success() && String::from_utf8_lossy(&o.stdout).contains("--secret") =>
        {
            Some(Kind::BuildKit)
        }
        _ => Some(Kind::Legacy),
    }
}

/// The docker CLIs on this host by kind. MUVEE_TEST_DOCKER_CLIS (colon-separated) overrides
/// the candidates.
fn clis() -> &'static Vec<(String, Kind)> {
    static CLIS: OnceLock<Vec<(String, Kind)>> = OnceLock::new();
    CLIS.get_or_init(|| {
        let list = std::env::var("MUVEE_TEST_DOCKER_CLIS")
            .unwrap_or_else(|_| "/usr/local/bin/docker:/usr/bin/docker".into());
        list.split(':')
            .filter(|c| !c.is_empty())
            .filter_map(|c| probe(c).map(|k| (c.to_string(), k)))
            .collect()
    })
}

/// The engine is up and a CLI of `kind` exists; otherwise skip loudly (fail in CI).
fn require_cli(test: &str, kind: Kind) -> Option<String> {
    if !util::require_docker(test) {
        return None;
    }
    if let Some((c, _)) = clis().iter().find(|(_, k)| *k == kind) {
        return Some(c.clone());
    }
    let msg = format!("no docker CLI of kind {kind:?} among {:?}", clis());
    if std::env::var("MUVEE_REQUIRE_DOCKER").as_deref() == Ok("1") {
        panic!("{test}: MUVEE_REQUIRE_DOCKER=1 but {msg}");
    }
    eprintln!("SKIPPED {test}: {msg}");
    None
}

/// GET on the registry API with the test credentials: (status line + headers, body).
fn registry_get(path: &str, accept: &str) -> (String, String) {
    let reg = util::registry();
    let mut s = std::net::TcpStream::connect(&reg.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let auth = util::base64(format!("{}:{}", reg.user, reg.password).as_bytes());
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {}\r\nAuthorization: Basic {auth}\r\nAccept: {accept}\r\n\r\n",
        reg.addr
    )
    .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).unwrap();
    let (h, b) = buf.split_once("\r\n\r\n").unwrap_or((&buf, ""));
    (h.to_string(), b.to_string())
}

/// The pushed tag is in the registry, its manifest digest is the one the agent logged, and
/// the image pulled back from the registry (with the agent's login) runs.
fn assert_pushed_and_runs(run: &Run, file: &str, expected: &str) {
    let tag = run.tag();
    let (repo, sha12) = tag.rsplit_once(':').unwrap();
    let project = repo.rsplit_once('/').unwrap().1;
    let (_, tags) = registry_get(&format!("/v2/{project}/tags/list"), "application/json");
    let tags: Value = serde_json::from_str(&tags).unwrap();
    assert!(
        tags["tags"].as_array().unwrap().iter().any(|t| t == sha12),
        "{tags}"
    );
    let (head, _) = registry_get(
        &format!("/v2/{project}/manifests/{sha12}"),
        "application/vnd.docker.distribution.manifest.v2+json",
    );
    let digest = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("docker-content-digest:")
                .map(|d| d.trim().to_string())
        })
        .unwrap_or_else(|| panic!("no digest header: {head}"));
    assert!(
        run.stderr
            .contains(&format!("Successfully pushed {tag} (digest {digest})")),
        "{}",
        run.dump()
    );
    // Drop the local copy, pull it back with the agent's docker config, run it.
    let dcfg = run.dcfg.display().to_string();
    let env = [("DOCKER_CONFIG", dcfg.as_str())];
    util::docker(&["rmi", "-f", tag], &[]);
    let pull = util::docker(&["pull", "-q", tag], &env);
    assert!(pull.status.success(), "{}", util::describe(&pull));
    let out = util::docker(&["run", "--rm", tag, "cat", file], &[]);
    assert!(out.status.success(), "{}", util::describe(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), expected);
    util::docker(&["rmi", "-f", tag], &[]);
}

/// A temp dir with the chosen shims from tests/fixtures/builder-shim, and a PATH that puts
/// it first.
/// PATH shims from tests/fixtures/builder-shim that record each call in `log`.
struct Shims {
    path: String,
    log: String,
}

impl Shims {
    fn new(names: &[&str]) -> Shims {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/builder-shim");
        let dir = temp_dir("shims");
        for n in names {
            std::os::unix::fs::symlink(fixtures.join(n), dir.join(n)).unwrap();
        }
        let path = format!(
            "{}:{}",
            dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let log = dir.join("calls.log").display().to_string();
        Shims { path, log }
    }

    /// The environment that puts the shims in front of the real tools.
    fn env(&self) -> [(&str, &str); 3] {
        [
            ("PATH", &self.path),
            ("DOCKER_CLI", "docker"),
            ("SHIM_LOG", &self.log),
        ]
    }

    fn calls(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn clear(&self) {
        let _ = std::fs::remove_file(&self.log);
    }
}

/// A bare repo with one Dockerfile under a fresh dir; returns (bare path, HEAD sha).
fn repo_with(dockerfile_body: &str, extra: &[(&str, &str)]) -> (PathBuf, String) {
    let dir = temp_dir("repo");
    let bare = dir.join("app.git");
    let df = dockerfile(dockerfile_body);
    let mut files = vec![("Dockerfile", df.as_str())];
    files.extend_from_slice(extra);
    let head = git_http::make_repo(&bare, "main", &files, &[]);
    (bare, head)
}

#[test]
fn public_repo_over_file_url_with_legacy_builder() {
    let Some(cli) = require_cli(test_name!(), Kind::Legacy) else {
        return;
    };
    let (bare, head) = repo_with("RUN echo built-by-legacy > /built.txt", &[]);
    let project = new_uuid();
    let run = run_build(
        &payload(&file_url(&bare), "main", &project),
        &[("DOCKER_CLI", &cli)],
        true,
    );
    run.assert_completed();
    let reg = util::registry();
    assert_eq!(run.tag(), format!("{}/{project}:{}", reg.addr, &head[..12]));
    assert!(run.stderr.contains("legacy builder"), "{}", run.dump());
    assert_pushed_and_runs(&run, "/built.txt", "built-by-legacy");
    run.assert_no_build_dirs();
}

#[test]
fn empty_branch_clones_the_default_branch_with_builtin_buildkit() {
    let Some(cli) = require_cli(test_name!(), Kind::BuildKit) else {
        return;
    };
    let dir = temp_dir("repo");
    let bare = dir.join("app.git");
    let df = dockerfile("COPY which.txt /which.txt");
    let head = git_http::make_repo(
        &bare,
        "trunk",
        &[("Dockerfile", &df), ("which.txt", "trunk\n")],
        &["other"],
    );
    let project = new_uuid();
    let run = run_build(
        &payload(&file_url(&bare), "", &project),
        &[("DOCKER_CLI", &cli)],
        true,
    );
    run.assert_completed();
    assert!(
        run.tag().ends_with(&format!(":{}", &head[..12])),
        "{}",
        run.dump()
    );
    assert!(run.stderr.contains("DOCKER_BUILDKIT=1"), "{}", run.dump());
    assert!(run.stderr.contains("(default branch)"), "{}", run.dump());
    assert_pushed_and_runs(&run, "/which.txt", "trunk");
    run.assert_no_build_dirs();
}

#[test]
fn token_repo_over_http_basic_auth_keeps_the_token_out_of_argv_logs_and_files() {
    let Some(cli) = require_cli(test_name!(), Kind::Legacy) else {
        return;
    };
    let root = temp_dir("githttp");
    let head = git_http::make_repo(
        &root.join("team/app.git"),
        "main",
        &[("Dockerfile", &dockerfile("RUN echo from-http > /src.txt"))],
        &[],
    );
    let token = format!("tok-{}", unique_hex());
    let server = GitHttp::start(&root, "builder", &token);
    let project = new_uuid();
    let mut p = payload(&format!("{}/team/app.git", server.url()), "main", &project);
    p["git_username"] = json!("builder");
    p["git_token"] = json!(token);
    let basic = util::base64(format!("builder:{token}").as_bytes());
    let sampler = ArgvSampler::start();
    let run = run_build(&p, &[("DOCKER_CLI", &cli)], true);
    let argvs = sampler.finish();
    run.assert_completed();
    assert!(run.tag().ends_with(&head[..12]));
    let reqs = server.requests();
    assert!(
        reqs.iter().any(|(_, a)| *a == format!("Basic {basic}")),
        "{reqs:?}"
    );
    assert!(reqs.iter().all(|(l, _)| !l.contains(&token)), "{reqs:?}");
    for a in &argvs {
        assert!(!a.contains(&token) && !a.contains(&basic), "argv leak: {a}");
    }
    assert!(argvs
        .iter()
        .any(|a| a.contains("fetch -q --depth=1 --no-tags")));
    assert!(!run.stderr.contains(&token) && !run.stderr.contains(&basic));
    assert!(util::files_containing(&run.data, &token).is_empty());
    assert_pushed_and_runs(&run, "/src.txt", "from-http");
    run.assert_no_build_dirs();
}

#[test]
fn wrong_token_fails_at_git_clone_without_leaking_it() {
    let root = temp_dir("githttp");
    git_http::make_repo(
        &root.join("app.git"),
        "main",
        &[("Dockerfile", "FROM x\n")],
        &[],
    );
    let server = GitHttp::start(&root, "builder", "right-token-1234");
    let shims = Shims::new(&["docker"]);
    let mut p = payload(&format!("{}/app.git", server.url()), "main", &new_uuid());
    p["git_username"] = json!("builder");
    p["git_token"] = json!("wrong-token-5678");
    let run = run_build(&p, &shims.env(), false);
    run.assert_failed();
    assert!(
        run.result().starts_with("git fetch exited 128"),
        "{}",
        run.dump()
    );
    assert!(!run.out.stdout.is_empty() && !run.stderr.contains("wrong-token-5678"));
    assert!(!run.result().contains("wrong-token-5678"));
    run.assert_no_build_dirs();
}

#[test]
fn hosted_repo_relative_url_is_cloned_from_the_control_plane() {
    let Some(cli) = require_cli(test_name!(), Kind::BuildKit) else {
        return;
    };
    let project = new_uuid();
    let root = temp_dir("hosted");
    let head = git_http::make_repo(
        &root.join(format!("git/{project}.git")),
        "main",
        &[("Dockerfile", &dockerfile("RUN echo hosted > /hosted.txt"))],
        &[],
    );
    let secret = format!("agent-secret-{}", unique_hex());
    let server = GitHttp::start(&root, "agent", &secret);
    let mut p = payload(&format!("/git/{project}.git"), "main", &project);
    p["git_username"] = json!("agent");
    p["git_token"] = json!(secret);
    let run = run_build(
        &p,
        &[
            ("DOCKER_CLI", &cli),
            ("CONTROL_PLANE_URL", &server.url()),
            ("AGENT_SECRET", &secret),
        ],
        true,
    );
    run.assert_completed();
    assert!(run.tag().ends_with(&head[..12]));
    let reqs = server.requests();
    assert!(
        reqs.iter()
            .all(|(l, _)| l.contains(&format!(" /git/{project}.git/"))),
        "{reqs:?}"
    );
    assert!(!run.stderr.contains(&secret));
    assert_pushed_and_runs(&run, "/hosted.txt", "hosted");
    run.assert_no_build_dirs();
}

#[test]
fn build_secret_reaches_the_dockerfile_but_never_logs_argv_or_files() {
    let Some(cli) = require_cli(test_name!(), Kind::BuildKit) else {
        return;
    };
    let root = temp_dir("githttp");
    // The RUN prints the secret on purpose: the agent must mask it in the shipped log.
    // A unique word in the RUN line: BuildKit's cache key does not cover secret values.
    let df = dockerfile(&format!(
        "RUN --mount=type=secret,id=api_key echo {} && tr a-z A-Z < /run/secrets/api_key \
         > /secret.up && cat /run/secrets/api_key && echo",
        unique_hex()
    ));
    git_http::make_repo(&root.join("app.git"), "main", &[("Dockerfile", &df)], &[]);
    let token = format!("tok-{}", unique_hex());
    let secret = format!("sekrit-{}", unique_hex());
    let server = GitHttp::start(&root, "builder", &token);
    let mut p = payload(&format!("{}/app.git", server.url()), "main", &new_uuid());
    p["git_username"] = json!("builder");
    p["git_token"] = json!(token);
    p["build_secrets"] = json!({ "api_key": secret });
    let sampler = ArgvSampler::start();
    let run = run_build(&p, &[("DOCKER_CLI", &cli)], true);
    let argvs = sampler.finish();
    run.assert_completed();
    assert!(
        argvs
            .iter()
            .any(|a| a.contains("build --platform linux/amd64")),
        "the sampler missed the build"
    );
    for a in &argvs {
        assert!(
            !a.contains(&secret) && !a.contains(&token),
            "argv leak: {a}"
        );
    }
    assert!(!run.stderr.contains(&secret), "{}", run.dump());
    assert!(!run.stderr.contains(&token));
    assert!(
        run.stderr.lines().any(|l| l.ends_with(" ***")),
        "the printed secret should show masked: {}",
        run.dump()
    );
    for needle in [&secret, &token] {
        let hits = util::files_containing(&run.data, needle);
        assert!(hits.is_empty(), "{hits:?}");
    }
    run.assert_no_build_dirs();
    assert_pushed_and_runs(&run, "/secret.up", &secret.to_uppercase());
}

#[test]
fn build_secrets_with_only_the_legacy_builder_fail_with_a_clear_reason() {
    let Some(cli) = require_cli(test_name!(), Kind::Legacy) else {
        return;
    };
    let (bare, _) = repo_with("RUN true", &[]);
    let mut p = payload(&file_url(&bare), "main", &new_uuid());
    p["build_secrets"] = json!({ "api_key": "secret-value-1234" });
    let run = run_build(&p, &[("DOCKER_CLI", &cli)], false);
    run.assert_failed();
    assert!(
        run.result().contains("build_secrets need BuildKit") && run.result().contains("buildx"),
        "{}",
        run.dump()
    );
    assert!(
        !run.data.join("builds").exists(),
        "nothing may be cloned for a build that cannot run"
    );
}

#[test]
fn failing_dockerfile_names_docker_build_and_the_run_error() {
    if !util::require_docker(test_name!()) {
        return;
    }
    let kinds = [Kind::Legacy, Kind::BuildKit];
    let (bare, _) = repo_with("RUN make", &[]);
    let mut ran = 0;
    for (cli, _) in clis().iter().filter(|(_, k)| kinds.contains(k)) {
        let run = run_build(
            &payload(&file_url(&bare), "main", &new_uuid()),
            &[("DOCKER_CLI", cli)],
            true,
        );
        run.assert_failed();
        let r = run.result();
        assert!(r.starts_with("docker build exited "), "{cli}: {r}");
        assert!(r.contains("make: not found"), "{cli}: {r}");
        run.assert_no_build_dirs();
        ran += 1;
    }
    assert!(ran > 0, "no docker CLI to test with: {:?}", clis());
}

#[test]
fn wrong_branch_fails_at_git_clone() {
    let (bare, _) = repo_with("RUN true", &[]);
    let shims = Shims::new(&["docker"]);
    let run = run_build(
        &payload(&file_url(&bare), "no-such-branch", &new_uuid()),
        &shims.env(),
        false,
    );
    run.assert_failed();
    let r = run.result();
    assert!(r.starts_with("git fetch exited 128"), "{}", run.dump());
    assert!(r.contains("no-such-branch"), "{r}");
    assert!(
        !shims.calls().iter().any(|l| is_build_call(l)),
        "no build after a failed clone"
    );
    run.assert_no_build_dirs();
}

#[test]
fn invalid_payloads_are_rejected_before_any_command_runs() {
    let shims = Shims::new(&["docker", "git", "ssh"]);
    let project = new_uuid();
    let ok = payload("https://git.example/a.git", "main", &project);
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "git_url",
            json!("--upload-pack=touch /tmp/pwned"),
            "`git_url`",
        ),
        ("git_url", json!("-oProxyCommand=x"), "`git_url`"),
        (
            "git_url",
            json!("ext::sh -c touch% /tmp/pwned"),
            "`git_url`",
        ),
        ("git_url", json!("ftp://h/x.git"), "`git_url`"),
        ("git_url", json!(null), "`git_url` is required"),
        (
            "dockerfile_path",
            json!("../Dockerfile"),
            "`dockerfile_path`",
        ),
        ("dockerfile_path", json!("app/../../x"), "`dockerfile_path`"),
        ("dockerfile_path", json!("/etc/passwd"), "`dockerfile_path`"),
        ("git_branch", json!("--upload-pack=x"), "`git_branch`"),
        ("git_branch", json!("a..b"), "`git_branch`"),
        ("project_id", json!("../../etc"), "`project_id`"),
        ("project_id", json!(7), "`project_id`"),
        (
            "build_secrets",
            json!({"a,src=/etc/shadow": "x"}),
            "`build_secrets`",
        ),
    ];
    for (field, value, expect) in cases {
        let mut p = ok.clone();
        p[field] = value.clone();
        let run = run_build(&p, &shims.env(), false);
        run.assert_failed();
        assert!(
            run.result().contains(expect),
            "{field}={value}: {}",
            run.dump()
        );
        assert!(!run.data.join("builds").exists(), "{field}={value}");
        assert_eq!(shims.calls(), Vec::<String>::new(), "{field}={value}");
    }
    // A token with an unencoded '/': refused, and the token is quoted nowhere.
    let mut p = ok.clone();
    p["git_url"] = json!("https://bob:tok-slash/9d1e@git.example/a.git");
    let run = run_build(&p, &shims.env(), false);
    run.assert_failed();
    assert!(run.result().contains("`git_url`"), "{}", run.dump());
    for part in ["tok-slash", "9d1e"] {
        assert!(
            !run.result().contains(part) && !run.stderr.contains(part),
            "{}",
            run.dump()
        );
    }
    assert_eq!(shims.calls(), Vec::<String>::new());
}

#[test]
fn dockerfile_symlink_leading_outside_the_clone_is_refused() {
    let (bare, _) = repo_with(
        "RUN true",
        &[
            ("link-abs", "symlink:/etc/hostname"),
            ("sub/link-rel", "symlink:../../../../../../etc/hostname"),
        ],
    );
    let shims = Shims::new(&["docker"]);
    for df in ["link-abs", "sub/link-rel"] {
        let mut p = payload(&file_url(&bare), "main", &new_uuid());
        p["dockerfile_path"] = json!(df);
        let run = run_build(&p, &shims.env(), false);
        run.assert_failed();
        assert!(
            run.result().contains("`dockerfile_path`")
                && run.result().contains("outside the repository"),
            "{}",
            run.dump()
        );
        run.assert_no_build_dirs();
    }
    assert!(!shims.calls().iter().any(|l| is_build_call(l)));
}

/// A recorded image build (not a `build --help` probe).
fn is_build_call(l: &str) -> bool {
    l.starts_with("docker\tbuildx\tbuild\t--platform") || l.starts_with("docker\tbuild\t--platform")
}

/// Splits a recorded argv line and replaces the per-run paths with placeholders.
fn argv_of(line: &str, data: &Path) -> (Vec<String>, PathBuf) {
    let argv: Vec<String> = line.split('\t').map(str::to_string).collect();
    let ctx = PathBuf::from(argv.last().unwrap());
    assert!(
        ctx.starts_with(data.join("builds")),
        "context {ctx:?} is not in DATA_DIR/builds"
    );
    let norm = argv
        .iter()
        .map(|a| {
            a.replace(&ctx.display().to_string(), "<CTX>")
                .replace(&ctx.parent().unwrap().display().to_string(), "<DIR>")
        })
        .collect();
    (norm, ctx)
}

#[test]
fn buildx_buildkit_and_legacy_argv_via_path_shim() {
    let (bare, head) = repo_with("RUN true", &[]);
    let project = new_uuid();
    let reg = util::registry();
    let tag = format!("{}/{project}:{}", reg.addr, &head[..12]);
    let mut p = payload(&file_url(&bare), "main", &project);
    p["build_secrets"] = json!({ "api_key": "value-one-1234", "db.pass": "value-two-5678" });
    let shims = Shims::new(&["docker"]);
    // The agent inherits the test's environment: this machine's own proxy settings must not
    // add build args, so every *_proxy variable it has is blanked.
    let inherited: Vec<String> = std::env::vars()
        .map(|(k, _)| k)
        .filter(|k| k.to_ascii_lowercase().ends_with("_proxy"))
        .collect();
    let mut env: Vec<(&str, &str)> = inherited.iter().map(|k| (k.as_str(), "")).collect();
    env.extend(shims.env());
    env.extend([
        (
            "HTTP_PROXY",
            "http://puser:proxy-pw-9d3e@proxy.invalid:3128",
        ),
        ("no_proxy", "localhost,127.0.0.1"),
    ]);
    let secrets = [
        "--secret",
        "id=api_key,src=<DIR>/secret-0",
        "--secret",
        "id=db.pass,src=<DIR>/secret-1",
    ];
    let proxies = ["--build-arg", "HTTP_PROXY", "--build-arg", "no_proxy"];
    let head_args = |build: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = ["docker"]
            .iter()
            .chain(build)
            .map(|s| s.to_string())
            .collect();
        v.extend(
            [
                "--platform",
                "linux/amd64",
                "-f",
                "<CTX>/Dockerfile",
                "-t",
                &tag,
            ]
            .iter()
            .map(|s| s.to_string()),
        );
        v
    };
    let strs = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();

    for mode in ["buildx", "buildkit", "legacy"] {
        shims.clear();
        let mut env = env.clone();
        env.push(("SHIM_MODE", mode));
        let mut p = p.clone();
        if mode == "legacy" {
            p["build_secrets"] = json!({});
        }
        let run = run_build(&p, &env, true);
        run.assert_completed();
        assert_eq!(run.tag(), tag);
        let calls = shims.calls();
        let all = calls.join("\n");
        assert_eq!(
            calls[0],
            format!(
                "docker\tlogin\t{}\t-u\t{}\t--password-stdin",
                reg.addr, reg.user
            )
        );
        let build_line = calls
            .iter()
            .find(|l| is_build_call(l))
            .unwrap_or_else(|| panic!("{mode}: no build call in {all}"));
        let (argv, ctx) = argv_of(build_line, &run.data);
        let mut want = match mode {
            "buildx" => head_args(&["buildx", "build"]),
            _ => head_args(&["build"]),
        };
        // The project's layer cache: its tag is a cache source and becomes this image.
        let cache = format!("{}/{project}:buildcache", reg.addr);
        let from = format!("type=registry,ref={cache}");
        match mode {
            "buildx" => want.extend(strs(&[
                "-t",
                &cache,
                "--cache-from",
                &from,
                "--cache-to",
                "type=inline",
                "--push",
            ])),
            "buildkit" => want.extend(strs(&[
                "-t",
                &cache,
                "--cache-from",
                &cache,
                "--build-arg",
                "BUILDKIT_INLINE_CACHE=1",
            ])),
            _ => want.push("--force-rm".into()),
        }
        if mode != "legacy" {
            want.extend(strs(&secrets));
        }
        want.extend(strs(&proxies));
        want.push("<CTX>".into());
        assert_eq!(argv, want, "{mode}");
        assert!(ctx.ends_with("src"), "{ctx:?}");
        assert!(all.contains("dockerfile exists"), "{all}");
        assert!(all.contains("env HTTP_PROXY set") && all.contains("env no_proxy set"));
        if mode != "legacy" {
            assert!(all.contains("secret api_key mode=600 bytes=14"), "{all}");
            assert!(all.contains("secret db.pass mode=600 bytes=14"), "{all}");
        }
        let push = format!("docker\tpush\t{tag}");
        match mode {
            "buildx" => {
                assert!(!calls.contains(&push), "{all}");
                let d = "a".repeat(64);
                assert!(run.stderr.contains(&format!("(digest sha256:{d})")));
            }
            _ => {
                let bk = if mode == "buildkit" { "1" } else { "0" };
                assert!(all.contains(&format!("env DOCKER_BUILDKIT={bk}")), "{all}");
                let pushes: Vec<&String> = calls
                    .iter()
                    .filter(|l| l.starts_with("docker\tpush"))
                    .collect();
                let cache_push = format!("docker\tpush\t{cache}");
                match mode {
                    "buildkit" => assert_eq!(pushes, [&push, &cache_push], "{all}"),
                    _ => assert_eq!(pushes, [&push], "{all}"),
                }
                let d = "b".repeat(64);
                assert!(run.stderr.contains(&format!("(digest sha256:{d})")));
            }
        }
        for leak in [
            "value-one-1234",
            "value-two-5678",
            "proxy-pw-9d3e",
            &reg.password,
        ] {
            assert!(!all.contains(leak), "{mode}: {leak} in argv: {all}");
            assert!(!run.stderr.contains(leak), "{mode}: {leak} in log");
        }
        assert!(run
            .stderr
            .contains("[proxy] passing HTTP_PROXY, no_proxy as build args"));
        run.assert_no_build_dirs();
    }

    // BUILDER_PROXY_PASSTHROUGH=false: no --build-arg at all.
    shims.clear();
    let mut off = env.clone();
    off.push(("BUILDER_PROXY_PASSTHROUGH", "false"));
    let run = run_build(&p, &off, true);
    run.assert_completed();
    assert!(!shims.calls().iter().any(|l| l.contains("--build-arg")));

    // The legacy builder cannot take build secrets: a clear failure, and no clone.
    shims.clear();
    let mut legacy = env.clone();
    legacy.push(("SHIM_MODE", "legacy"));
    let run = run_build(&p, &legacy, true);
    run.assert_failed();
    assert!(
        run.result().contains("build_secrets need BuildKit"),
        "{}",
        run.dump()
    );
    assert!(!run.data.join("builds").exists());
}

#[test]
fn ssh_key_goes_to_a_private_file_with_trust_on_first_use() {
    let shims = Shims::new(&["docker", "ssh"]);
    let key_body = format!("b3BlbnNzaC1rZXktdjEAAAAAB{}", unique_hex());
    let key = format!(
        "-----BEGIN OPENSSH PRIVATE KEY-----\n{key_body}\n-----END OPENSSH PRIVATE KEY-----"
    );
    let mut p = payload("ssh://git@127.0.0.1:1/team/app.git", "main", &new_uuid());
    p["git_ssh_key"] = json!(key);
    let run = run_build(&p, &shims.env(), false);
    run.assert_failed();
    assert!(
        run.result().starts_with("git fetch exited 128")
            && run.result().contains("Connection refused"),
        "{}",
        run.dump()
    );
    let calls = shims.calls();
    let ssh = calls
        .iter()
        .find(|l| l.starts_with("ssh\t"))
        .unwrap_or_else(|| panic!("ssh not called: {calls:?}"));
    let argv: Vec<&str> = ssh.split('\t').collect();
    let known = run.data.join("known_hosts").display().to_string();
    for opt in [
        "IdentitiesOnly=yes",
        "StrictHostKeyChecking=accept-new",
        &format!("UserKnownHostsFile={known}"),
    ] {
        let i = argv.iter().position(|a| *a == opt);
        assert!(
            i.is_some_and(|i| argv[i - 1] == "-o"),
            "{opt} missing: {argv:?}"
        );
    }
    let key_path = argv[argv.iter().position(|a| *a == "-i").unwrap() + 1];
    assert!(
        Path::new(key_path).starts_with(run.data.join("builds")),
        "{key_path}"
    );
    assert!(
        calls.contains(&"key mode=600 lines=3".to_string()),
        "{calls:?}"
    );
    assert!(!Path::new(key_path).exists(), "key file left behind");
    assert!(!run.stderr.contains(&key_body));
    assert!(util::files_containing(&run.data, &key_body).is_empty());
    run.assert_no_build_dirs();
}

/// Processes whose argv contains `needle` (other than the test process itself).
fn procs_with(needle: &str) -> Vec<String> {
    let me = std::process::id().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy() != me.as_str())
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .filter(|c| c.contains(needle))
        .collect()
}

#[test]
fn build_timeout_kills_docker_build_and_leaves_no_process_behind() {
    let Some(cli) = require_cli(test_name!(), Kind::Legacy) else {
        return;
    };
    // An unusual duration so no other test's process matches.
    let (bare, _) = repo_with("RUN sleep 67", &[]);
    let project = new_uuid();
    let t0 = Instant::now();
    let run = run_build(
        &payload(&file_url(&bare), "main", &project),
        &[("DOCKER_CLI", &cli), ("BUILD_TIMEOUT", "10s")],
        true,
    );
    let took = t0.elapsed();
    run.assert_failed();
    assert!(
        run.result()
            .starts_with("docker build timed out after 10s (BUILD_TIMEOUT)"),
        "{}",
        run.dump()
    );
    assert!(took < Duration::from_secs(60), "took {took:?}");
    assert!(
        procs_with(&project).is_empty(),
        "{:?}",
        procs_with(&project)
    );
    // The engine stops the build container once its client is gone.
    assert!(
        util::poll(15, || procs_with("sleep 67").is_empty()),
        "still running: {:?}",
        procs_with("sleep 67")
    );
    run.assert_no_build_dirs();
}

#[test]
fn cancel_mid_build_kills_docker_build_and_cleans_up() {
    let Some(cli) = require_cli(test_name!(), Kind::BuildKit) else {
        return;
    };
    let (bare, _) = repo_with("RUN sleep 68", &[]);
    let project = new_uuid();
    let reg = util::registry();
    let data = temp_dir("bdata");
    // stderr to a file, so the child can be polled without draining a pipe.
    let stderr_path = data.with_extension("stderr");
    let mut child = Command::new(util::bin())
        .args(["run-task", "--type", "build", "--registry-addr", &reg.addr])
        .env("DATA_DIR", &data)
        .env("DOCKER_CONFIG", temp_dir("bdcfg"))
        .env("DOCKER_CLI", &cli)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .unwrap();
    let input = payload(&file_url(&bare), "main", &project).to_string();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    // Wait until `docker build -t <registry>/<project>:...` runs, then SIGTERM until it exits
    // (the first signal drains, the second cancels running work).
    assert!(
        util::poll(60, || !procs_with(&format!("/{project}:")).is_empty()),
        "the build never started"
    );
    std::thread::sleep(Duration::from_millis(500));
    // Signals sent close together can merge into one, so keep signalling until it exits.
    for _ in 0..100 {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        util::signal(child.id() as i32, libc::SIGTERM);
        std::thread::sleep(Duration::from_millis(300));
    }
    let out = child.wait_with_output().unwrap();
    let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    let body: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    let describe = || format!("{:?}\nstdout: {body}\nstderr:\n{stderr}", out.status);
    assert_eq!(body["status"], "failed", "{}", describe());
    assert!(
        body["result"].as_str().unwrap_or("").contains("canceled"),
        "{}",
        describe()
    );
    assert!(
        procs_with(&project).is_empty(),
        "{:?}",
        procs_with(&project)
    );
    assert!(
        util::poll(15, || procs_with("sleep 68").is_empty()),
        "{:?}",
        procs_with("sleep 68")
    );
    let left: Vec<_> = std::fs::read_dir(data.join("builds"))
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn credentials_written_into_the_url_never_reach_argv() {
    let root = temp_dir("githttp");
    git_http::make_repo(
        &root.join("app.git"),
        "main",
        &[("Dockerfile", "FROM x\n")],
        &[],
    );
    let token = format!("tok-{}", unique_hex());
    let server = GitHttp::start(&root, "builder", &token);
    let shims = Shims::new(&["docker"]);
    let url = server
        .url()
        .replace("http://", &format!("http://builder:{token}@"));
    let sampler = ArgvSampler::start();
    let run = run_build(
        &payload(&format!("{url}/app.git"), "main", &new_uuid()),
        &shims.env(),
        true,
    );
    let argvs = sampler.finish();
    run.assert_completed();
    assert!(argvs.iter().all(|a| !a.contains(&token)), "argv leak");
    assert!(!run.stderr.contains(&token), "{}", run.dump());
    let basic = util::base64(format!("builder:{token}").as_bytes());
    assert!(server
        .requests()
        .iter()
        .any(|(_, a)| *a == format!("Basic {basic}")));
    run.assert_no_build_dirs();
}

#[test]
fn a_silent_build_step_hits_the_idle_timeout() {
    let Some(cli) = require_cli(test_name!(), Kind::Legacy) else {
        return;
    };
    let (bare, _) = repo_with("RUN sleep 69", &[]);
    let run = run_build(
        &payload(&file_url(&bare), "main", &new_uuid()),
        &[("DOCKER_CLI", &cli), ("BUILD_IDLE_TIMEOUT", "6s")],
        true,
    );
    run.assert_failed();
    assert!(
        run.result()
            .starts_with("docker build produced no output for 6s and was killed"),
        "{}",
        run.dump()
    );
    assert!(
        util::poll(15, || procs_with("sleep 69").is_empty()),
        "{:?}",
        procs_with("sleep 69")
    );
    run.assert_no_build_dirs();
}

/// Build dirs (and the secret files in them) of `data`.
fn secret_files(data: &Path) -> Vec<PathBuf> {
    let dirs = std::fs::read_dir(data.join("builds"))
        .into_iter()
        .flatten()
        .flatten();
    dirs.flat_map(|d| std::fs::read_dir(d.path()).into_iter().flatten().flatten())
        .map(|f| f.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("secret-"))
        })
        .collect()
}

/// In a container the agent is PID 1 on every start. A build killed by SIGKILL leaves its
/// dir (clone, build secret file) behind; the next start, PID 1 again, must remove it and
/// build the same project.
#[test]
fn a_killed_builds_dir_is_swept_by_the_next_start_as_pid_1() {
    let ns = ["-p", "-f", "--mount-proc"];
    let ok = Command::new("unshare").args(ns).arg("true").status();
    if !ok.is_ok_and(|s| s.success()) {
        assert!(
            std::env::var("MUVEE_REQUIRE_DOCKER").as_deref() != Ok("1"),
            "unshare -p is not available"
        );
        eprintln!("SKIPPED a_killed_builds_dir_is_swept_by_the_next_start_as_pid_1: no unshare -p");
        return;
    }
    let (bare, _) = repo_with("RUN true", &[]);
    let shims = Shims::new(&["docker"]);
    let data = temp_dir("bdata-pid1");
    let secret = format!("sec-pid1-{}", unique_hex());
    let mut p = payload(&file_url(&bare), "main", &new_uuid());
    p["build_secrets"] = json!({"token": secret});
    let spawn = |sleep: &str| {
        let mut child = Command::new("unshare")
            .args(ns)
            .arg(util::bin())
            .args([
                "run-task",
                "--type",
                "build",
                "--registry-addr",
                "127.0.0.1:5999",
            ])
            .env("DATA_DIR", &data)
            .env("SHIM_BUILD_SLEEP", sleep)
            .envs(shims.env())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let input = p.to_string();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        child
    };
    let mut first = spawn("60");
    assert!(
        util::poll(60, || secret_files(&data).len() == 1),
        "the build never wrote its secret file"
    );
    // The agent is unshare's only child (PID 1 inside); its death ends the namespace.
    let children = format!("/proc/{0}/task/{0}/children", first.id());
    let agent: i32 = std::fs::read_to_string(children)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    util::signal(agent, libc::SIGKILL);
    first.wait().unwrap();
    assert_eq!(
        secret_files(&data).len(),
        1,
        "the killed build left nothing behind?"
    );

    let out = spawn("0").wait_with_output().unwrap();
    let body: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    assert_eq!(body["status"], "completed", "{}", util::describe(&out));
    assert!(secret_files(&data).is_empty(), "{:?}", secret_files(&data));
    let left: Vec<_> = std::fs::read_dir(data.join("builds"))
        .unwrap()
        .flatten()
        .collect();
    assert!(left.is_empty(), "{left:?}");
    assert!(util::files_containing(&data, &secret).is_empty());
}
