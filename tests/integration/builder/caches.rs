//! What a build does again costs only the difference: the git cache under DATA_DIR/git (real
//! git over file:// and smart HTTP with Basic auth) and the registry's layer cache.

use super::{
    assert_pushed_and_runs, dockerfile, file_url, payload, registry_get, repo_with, require_cli,
    run_build, run_build_in, Kind, Run, Shims,
};
use crate::git_http::{self, GitHttp};
use crate::util::{self, new_uuid, temp_dir, unique_hex};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Commits `files` on `branch` of the bare repo `bare` (a clone, a commit, a push); returns
/// the new HEAD.
fn commit_to(bare: &Path, branch: &str, files: &[(&str, &[u8])]) -> String {
    let work = temp_dir("commit");
    let git = |args: &[&str]| {
        let out = Command::new("git")
            .args(["-c", "user.name=t", "-c", "user.email=t@example.invalid"])
            .args(args)
            .current_dir(&work)
            .output()
            .unwrap();
        assert!(out.status.success(), "git {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    git(&[
        "clone",
        "-q",
        "-b",
        branch,
        &bare.display().to_string(),
        ".",
    ]);
    for (path, content) in files {
        std::fs::write(work.join(path), content).unwrap();
    }
    git(&["add", "-A"]);
    git(&["commit", "-qm", "change"]);
    git(&["push", "-q", "origin", branch]);
    let head = git(&["rev-parse", "HEAD"]);
    let _ = std::fs::remove_dir_all(&work);
    head
}

fn random_bytes(n: usize) -> Vec<u8> {
    use std::io::Read;
    let mut b = vec![0; n];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut b)
        .unwrap();
    b
}

/// The bytes the build's "Git cache: fetched N bytes" line names.
fn fetched(stderr: &str) -> u64 {
    let line = stderr
        .lines()
        .find_map(|l| l.split_once("Git cache: fetched ").map(|(_, r)| r))
        .unwrap_or_else(|| panic!("no git cache line in:\n{stderr}"));
    line.split(' ').next().unwrap().parse().unwrap()
}

/// The cache entries (`DATA_DIR/git/<key>/repo`), and every other name under DATA_DIR/git.
fn cache_entries(data: &Path) -> (Vec<PathBuf>, Vec<String>) {
    let (mut repos, mut other) = (Vec::new(), Vec::new());
    for e in std::fs::read_dir(data.join("git")).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if e.path().join("repo").is_dir() && !name.starts_with('.') {
            repos.push(e.path().join("repo"));
        } else {
            other.push(name);
        }
    }
    (repos, other)
}

#[test]
fn a_second_build_fetches_only_the_new_commit_and_every_build_fetches_with_its_own_token() {
    let Some(cli) = require_cli(
        "a_second_build_fetches_only_the_new_commit_and_every_build_fetches_with_its_own_token",
        Kind::BuildKit,
    ) else {
        return;
    };
    let root = temp_dir("githttp");
    let bare = root.join("team/app.git");
    let df = dockerfile("COPY version.txt /version.txt");
    git_http::make_repo(&bare, "main", &[("Dockerfile", &df)], &[]);
    // 1 MiB that never changes, then the commit the first build takes.
    commit_to(&bare, "main", &[("blob.bin", &random_bytes(1 << 20))]);
    commit_to(&bare, "main", &[("version.txt", b"v1")]);
    let token = format!("tok-{}", unique_hex());
    let server = GitHttp::start(&root, "builder", &token);
    let project = new_uuid();
    let mut p = payload(&format!("{}/team/app.git", server.url()), "main", &project);
    p["git_username"] = json!("builder");
    p["git_token"] = json!(token);
    let data = temp_dir("bdata");
    let env = [("DOCKER_CLI", cli.as_str())];
    let first = run_build_in(&data, &p, &env, true);
    first.assert_completed();
    let (repos, _) = cache_entries(&data);
    assert_eq!(repos.len(), 1, "{}", first.dump());
    // Whatever happens to the cache's work tree, a build takes the commit's own files.
    std::fs::write(repos[0].join("Dockerfile"), "FROM scratch\nCOPY nope /\n").unwrap();
    let head = commit_to(&bare, "main", &[("version.txt", b"v2")]);
    let seen = server.requests().len();
    let second = run_build_in(&data, &p, &env, true);
    second.assert_completed();
    assert!(second.tag().ends_with(&head[..12]), "{}", second.dump());
    let (f1, f2) = (fetched(&first.stderr), fetched(&second.stderr));
    assert!(f1 > 1 << 20 && f2 * 20 < f1, "fetched {f1} then {f2} bytes");
    assert_pushed_and_runs(&second, "/version.txt", "v2");
    // The second build asked the server, with its credentials.
    let basic = format!(
        "Basic {}",
        util::base64(format!("builder:{token}").as_bytes())
    );
    let asked = &server.requests()[seen..];
    assert!(
        !asked.is_empty() && asked.iter().all(|(_, a)| *a == basic),
        "{asked:?}"
    );
    // A build whose token the server refuses gets nothing from the cache.
    p["git_token"] = json!("wrong-token-61c2");
    let refused = run_build_in(&data, &p, &env, true);
    refused.assert_failed();
    assert!(
        refused.result().starts_with("git fetch exited 128"),
        "{}",
        refused.dump()
    );
    assert!(
        !refused.stderr.contains("Building image"),
        "{}",
        refused.dump()
    );
    // No credential on disk: the cache's config names the URL alone.
    let config = std::fs::read_to_string(repos[0].join(".git/config")).unwrap();
    assert!(
        config.contains(&format!("url = {}/team/app.git\n", server.url())),
        "{config}"
    );
    assert!(util::files_containing(&data, &token).is_empty());
    assert!(util::files_containing(&data, &basic[6..]).is_empty());
    second.assert_no_build_dirs();
}

#[test]
fn a_corrupt_or_interrupted_cache_entry_is_rebuilt() {
    let (bare, head) = repo_with("RUN true", &[("which.txt", "one")]);
    let shims = Shims::new(&["docker"]);
    let mut env = shims.env().to_vec();
    env.extend([("SHIM_MODE", "buildkit"), ("SHIM_CAT", "which.txt")]);
    let p = payload(&file_url(&bare), "main", &new_uuid());
    let data = temp_dir("bdata");
    let built = |want: &str| {
        shims.clear();
        let run = run_build_in(&data, &p, &env, false);
        run.assert_completed();
        assert!(run.tag().ends_with(&head[..12]), "{}", run.dump());
        let ctx = format!("context {} which.txt={want}", run.tag());
        assert!(shims.calls().contains(&ctx), "{:?}", shims.calls());
        run
    };
    built("one");
    let (repos, _) = cache_entries(&data);
    // Lost objects: git refuses, the build fetches into a new entry.
    let mut dirs = vec![repos[0].join(".git/objects")];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(d).unwrap().flatten() {
            if e.path().is_dir() {
                dirs.push(e.path());
            } else {
                std::fs::remove_file(e.path()).unwrap();
                std::fs::write(e.path(), b"garbage").unwrap();
            }
        }
    }
    let run = built("one");
    assert!(
        run.stderr.contains("fetching into a new cache entry"),
        "{}",
        run.dump()
    );
    // A git killed mid-checkout leaves its lock behind.
    std::fs::write(repos[0].join(".git/index.lock"), b"").unwrap();
    let run = built("one");
    assert!(
        run.stderr.contains("fetching into a new cache entry"),
        "{}",
        run.dump()
    );
    // An entry whose first build never finished has no `source`: it is not used.
    std::fs::remove_file(repos[0].parent().unwrap().join("source")).unwrap();
    std::fs::write(repos[0].join("which.txt"), "stale").unwrap();
    built("one");
    let (repos, other) = cache_entries(&data);
    assert_eq!(repos.len(), 1);
    assert!(other.iter().all(|n| n.ends_with(".lock")), "{other:?}");
}

#[test]
fn concurrent_builds_of_one_repository_each_get_their_branch() {
    let dir = temp_dir("repo");
    let bare = dir.join("app.git");
    let df = dockerfile("RUN true");
    git_http::make_repo(&bare, "main", &[("Dockerfile", &df)], &["blue", "green"]);
    let shims = Shims::new(&["docker"]);
    let mut env = shims.env().to_vec();
    env.extend([("SHIM_MODE", "buildkit"), ("SHIM_CAT", "branch.txt")]);
    let data = temp_dir("bdata");
    let runs: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = ["blue", "green", "blue", "green"]
            .iter()
            .map(|b| {
                let p = payload(&file_url(&bare), b, &new_uuid());
                let (data, env) = (&data, &env);
                s.spawn(move || (b, run_build_in(data, &p, env, false)))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let calls = shims.calls();
    for (branch, run) in &runs {
        run.assert_completed();
        let ctx = format!("context {} branch.txt={branch}", run.tag());
        assert!(calls.contains(&ctx), "{branch}: {calls:?}\n{}", run.dump());
    }
    let (repos, other) = cache_entries(&data);
    assert_eq!(repos.len(), 1);
    assert!(other.iter().all(|n| n.ends_with(".lock")), "{other:?}");
}

#[test]
fn the_git_cache_stays_within_git_cache_max_and_can_be_turned_off() {
    let (a, _) = repo_with("RUN true", &[]);
    let (b, _) = repo_with("RUN true", &[]);
    let shims = Shims::new(&["docker"]);
    let mut env = shims.env().to_vec();
    env.extend([("SHIM_MODE", "buildkit"), ("GIT_CACHE_MAX", "1")]);
    let data = temp_dir("bdata");
    for repo in [&a, &b] {
        run_build_in(
            &data,
            &payload(&file_url(repo), "main", &new_uuid()),
            &env,
            false,
        )
        .assert_completed();
    }
    // Only the entry the last build used is left, and no lock of another.
    let (repos, other) = cache_entries(&data);
    assert_eq!(repos.len(), 1, "{repos:?} {other:?}");
    let source = std::fs::read_to_string(repos[0].parent().unwrap().join("source")).unwrap();
    assert_eq!(source, format!("{}\nanonymous\n", file_url(&b)));
    assert_eq!(other.len(), 1, "{other:?}");
    // GIT_CACHE_MAX=0: the shallow clone of old, nothing kept.
    env.push(("GIT_CACHE_MAX", "0"));
    let run = run_build(&payload(&file_url(&a), "main", &new_uuid()), &env, false);
    run.assert_completed();
    assert!(!run.data.join("git").exists());
    assert!(!run.stderr.contains("Git cache"), "{}", run.dump());
}

/// The build step whose title contains `title` ended with `end` (`DONE`, `CACHED`): BuildKit's
/// plain progress numbers steps (`#4 importing cache manifest from …`, then `#4 DONE 0.1s`).
fn step_ended(log: &str, title: &str, end: &str) -> bool {
    let Some(id) = log.lines().find_map(|l| {
        let (id, rest) = l.split_once(' ')?;
        (id.starts_with('#') && rest.contains(title)).then_some(id)
    }) else {
        return false;
    };
    let prefix = format!("{id} {end}");
    log.lines().any(|l| l.starts_with(&prefix))
}

#[test]
fn a_second_builder_node_takes_the_layers_from_the_registry() {
    let Some(cli) = require_cli(
        "a_second_builder_node_takes_the_layers_from_the_registry",
        Kind::BuildKit,
    ) else {
        return;
    };
    let nonce = unique_hex();
    let dep = format!("RUN echo {nonce} > /dep.txt\nCOPY app.txt /app.txt");
    let (bare, _) = repo_with(&dep, &[("app.txt", "one")]);
    let project = new_uuid();
    let p = payload(&file_url(&bare), "main", &project);
    let env = [("DOCKER_CLI", cli.as_str())];
    // The first build of a project has no cache tag to read, and builds all the same.
    let first = run_build(&p, &env, true);
    first.assert_completed();
    let reg = util::registry();
    let cache = format!("{}/{project}:buildcache", reg.addr);
    assert!(first
        .stderr
        .contains(&format!("importing cache manifest from {cache}")));
    // The cache tag is the image, with BuildKit's inline cache metadata in its config.
    let accept = "application/vnd.docker.distribution.manifest.v2+json";
    let (_, manifest) = registry_get(&format!("/v2/{project}/manifests/buildcache"), accept);
    let manifest: serde_json::Value = serde_json::from_str(&manifest).unwrap();
    let config = manifest["config"]["digest"].as_str().unwrap();
    let (_, config) = registry_get(&format!("/v2/{project}/blobs/{config}"), "*/*");
    assert!(config.contains("moby.buildkit.cache.v0"), "{config}");
    // Another node (its own DATA_DIR, docker login and no image of the project) builds the
    // next commit: the dependency step comes from the cache.
    for t in [first.tag(), cache.as_str()] {
        util::docker(&["rmi", "-f", t], &[]);
    }
    commit_to(&bare, "main", &[("app.txt", b"two")]);
    let second = run_build(&p, &env, true);
    second.assert_completed();
    let log = &second.stderr;
    let import = format!("importing cache manifest from {cache}");
    assert!(step_ended(log, &import, "DONE"), "{}", second.dump());
    assert!(
        step_ended(log, &format!("RUN echo {nonce}"), "CACHED"),
        "{}",
        second.dump()
    );
    assert!(!log.contains(&reg.password));
    assert_pushed_and_runs(&second, "/app.txt", "two");
    util::docker(&["rmi", "-f", &cache], &[]);
}

/// `git ARGS` in the repository `dir` (its own .git only); (success, stdout).
fn git_in(dir: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new("git")
        .env("GIT_DIR", dir.join(".git"))
        .env("GIT_WORK_TREE", dir)
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success(), stdout)
}

/// The build context of a build run with the shims, as the image would get it.
fn built_context(data: &Path, shims: &Shims, p: &serde_json::Value) -> (Run, PathBuf, String) {
    let keep = temp_dir("kept-context").join("ctx");
    let keep_s = keep.display().to_string();
    let mut env = shims.env().to_vec();
    env.extend([("SHIM_MODE", "buildkit"), ("SHIM_KEEP", keep_s.as_str())]);
    let run = run_build_in(data, p, &env, false);
    run.assert_completed();
    let refs = git_in(&keep, &["for-each-ref", "--format=%(refname)"]).1;
    (run, keep, refs)
}

#[test]
fn builds_with_other_credentials_share_no_objects_and_a_build_sees_only_its_branch() {
    // Alice's view of app.git has the branch `payroll`; Bob's, at the same URL, only `main`.
    let root = temp_dir("views");
    let alice_bare = root.join("alice/app.git");
    let df = dockerfile("COPY . /src");
    git_http::make_repo(&alice_bare, "main", &[("Dockerfile", &df)], &["payroll"]);
    let bob_bare = root.join("bob/app.git");
    let out = Command::new("git")
        .args(["clone", "-q", "--bare", "--single-branch", "-b", "main"])
        .args([&alice_bare, &bob_bare])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let payroll = commit_to(&alice_bare, "payroll", &[("salaries.txt", b"TOP-SECRET")]);
    let (ta, tb) = (
        format!("tok-a-{}", unique_hex()),
        format!("tok-b-{}", unique_hex()),
    );
    let server = GitHttp::start_views(&[
        ("alice", &ta, &root.join("alice")),
        ("bob", &tb, &root.join("bob")),
    ]);
    let url = format!("{}/app.git", server.url());
    let shims = Shims::new(&["docker"]);
    let data = temp_dir("bdata");
    let as_user = |user: &str, token: &str, branch: &str| {
        let mut p = payload(&url, branch, &new_uuid());
        p["git_username"] = json!(user);
        p["git_token"] = json!(token);
        p
    };
    let (_, ctx, refs) = built_context(&data, &shims, &as_user("alice", &ta, "payroll"));
    assert_eq!(refs, "refs/heads/payroll");
    assert_eq!(
        std::fs::read(ctx.join("salaries.txt")).unwrap(),
        b"TOP-SECRET"
    );
    // Bob: his own entry, so none of Alice's objects; only his branch.
    let (run, ctx, refs) = built_context(&data, &shims, &as_user("bob", &tb, "main"));
    assert_eq!(refs, "refs/heads/main", "{}", run.dump());
    assert!(!git_in(&ctx, &["cat-file", "-e", &payroll]).0);
    assert!(!ctx.join(".git/logs").exists() && !ctx.join(".git/packed-refs").exists());
    let config = std::fs::read_to_string(ctx.join(".git/config")).unwrap();
    assert!(!config.contains("payroll"), "{config}");
    assert_eq!(cache_entries(&data).0.len(), 2);
    // Alice deletes the branch; her next build of main shows no trace of it through refs.
    let out = Command::new("git")
        .arg("--git-dir")
        .arg(&alice_bare)
        .args(["branch", "-D", "payroll"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let (run, ctx, refs) = built_context(&data, &shims, &as_user("alice", &ta, "main"));
    assert_eq!(refs, "refs/heads/main", "{}", run.dump());
    assert!(!git_in(&ctx, &["rev-parse", "--verify", "-q", "payroll"]).0);
    assert!(!ctx.join("salaries.txt").exists());
    // Same credentials, same entry.
    assert_eq!(cache_entries(&data).0.len(), 2);
    // No build reads an entry directly, without credentials.
    let (repos, _) = cache_entries(&data);
    for repo in repos {
        let p = payload(&format!("file://{}", repo.display()), "main", &new_uuid());
        let run = run_build_in(&data, &p, &shims.env(), false);
        run.assert_failed();
        assert!(run.result().contains("`git_url`"), "{}", run.dump());
    }
}

#[test]
fn a_broken_entry_inside_an_enclosing_git_repository_is_rebuilt_and_the_repository_untouched() {
    let (bare, head) = repo_with("RUN true", &[("which.txt", "one")]);
    // DATA_DIR inside someone's work tree, with a commit and a file of theirs.
    let outer = temp_dir("outer");
    assert!(git_in(&outer, &["init", "-q", "-b", "mine"]).0);
    std::fs::write(outer.join("precious.txt"), "precious").unwrap();
    assert!(git_in(&outer, &["add", "precious.txt"]).0);
    let out = Command::new("git")
        .args(["-c", "user.name=t", "-c", "user.email=t@example.invalid"])
        .current_dir(&outer)
        .args(["commit", "-qm", "mine"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let mine = git_in(&outer, &["rev-parse", "HEAD"]).1;
    let data = outer.join("data");
    let shims = Shims::new(&["docker"]);
    let p = payload(&file_url(&bare), "main", &new_uuid());
    let (run, ctx, _) = built_context(&data, &shims, &p);
    assert!(run.tag().ends_with(&head[..12]), "{}", run.dump());
    assert_eq!(
        std::fs::read_to_string(ctx.join("which.txt")).unwrap(),
        "one"
    );
    let (repos, _) = cache_entries(&data);
    std::fs::remove_file(repos[0].join(".git/HEAD")).unwrap();
    let (run, ctx, refs) = built_context(&data, &shims, &p);
    assert!(run.tag().ends_with(&head[..12]), "{}", run.dump());
    assert!(
        run.stderr.contains("fetching into a new cache entry"),
        "{}",
        run.dump()
    );
    assert_eq!(refs, "refs/heads/main");
    assert_eq!(
        std::fs::read_to_string(ctx.join("which.txt")).unwrap(),
        "one"
    );
    // The enclosing repository: same commit, same branch, its file, nothing else tracked.
    assert_eq!(git_in(&outer, &["rev-parse", "HEAD"]).1, mine);
    assert_eq!(
        git_in(&outer, &["for-each-ref", "--format=%(refname)"]).1,
        "refs/heads/mine"
    );
    assert_eq!(
        std::fs::read_to_string(outer.join("precious.txt")).unwrap(),
        "precious"
    );
    assert_eq!(git_in(&outer, &["status", "--porcelain"]).1, "?? data/");
}
