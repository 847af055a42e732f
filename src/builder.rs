//! Builder role: clone, build and push an image.
//!
//! Unlike the Go agent, credentials never reach argv or the clone URL (HTTPS tokens go in
//! through GIT_CONFIG_* env, build secrets and the SSH key through 0600 files in a private
//! dir), SSH host keys are trusted on first use instead of not checked, every input is
//! validated before anything runs, and the clone dir, key and secret files are removed
//! however the build ends.

use crate::executor::{self, Cmd, ExecError};
use crate::redact;
use crate::tasks::Ctx;
use crate::wire::Payload;
use std::fs::{DirBuilder, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Once, OnceLock};
use std::time::{Duration, Instant};

/// How this host builds images, detected once per start.
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

/// Probes what the CLI actually does rather than trusting its version number: a 23+ CLI
/// without the buildx plugin answers `DOCKER_BUILDKIT=1 docker build` with "BuildKit is
/// enabled but the buildx component is missing" (exit 1) and only has the legacy builder;
/// a 20.10 CLI has BuildKit (and `--secret`) built in.
pub fn detect_build_mode(docker: &str) -> BuildMode {
    let probe =
        |cmd: Cmd| executor::output(&cmd.timeout(Duration::from_secs(20), "docker probe timeout"));
    if probe(Cmd::new(docker).args(["buildx", "version"])).is_ok() {
        return BuildMode::Buildx;
    }
    let help = probe(
        Cmd::new(docker)
            .args(["build", "--help"])
            .env("DOCKER_BUILDKIT", "1"),
    );
    match help {
        Ok(o) if o.stdout.contains("--secret") => BuildMode::BuildKit,
        _ => BuildMode::Legacy,
    }
}

/// The build mode of this process: probed on the first build, then cached.
pub fn build_mode(docker: &str) -> BuildMode {
    static MODE: OnceLock<BuildMode> = OnceLock::new();
    *MODE.get_or_init(|| {
        let m = detect_build_mode(docker);
        log::info!("builder: {docker} builds with {}", m.describe());
        m
    })
}

/// Proxy variables handed to builds (values come from our environment, see `build_args`).
const PROXY_VARS: &[&str] = &[
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "ALL_PROXY",
    "FTP_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "all_proxy",
    "ftp_proxy",
];

/// A validated build payload.
#[derive(Debug)]
struct Job {
    /// What git clones (hosted paths already prefixed with CONTROL_PLANE_URL).
    url: String,
    branch: String,
    dockerfile: PathBuf,
    project: String,
    /// `Authorization: Basic ...` for HTTP(S) clones.
    auth_header: Option<String>,
    ssh_key: Option<String>,
    secrets: Vec<(String, String)>,
}

/// Reads and validates the payload. Secrets are registered for redaction first, so even a
/// validation message cannot carry one.
fn parse_job(payload: &serde_json::Value, control_plane_url: &str) -> Result<Job, String> {
    let p = Payload::of(payload)?;
    let user = p.str("git_username")?;
    let token = p.str("git_token")?;
    let ssh_key = p.str("git_ssh_key")?;
    let secrets = p.string_map("build_secrets")?;
    redact::add(token);
    redact::add(ssh_key);
    for (_, v) in &secrets {
        redact::add(v);
    }
    // Credentials written into an http(s) URL move to the header as well: never in argv.
    let (url, url_creds) = split_userinfo(&clone_url(p.required("git_url")?, control_plane_url)?);
    let creds = match (user.is_empty(), token.is_empty()) {
        (true, true) => url_creds,
        (false, false) => Some((user.to_string(), token.to_string())),
        _ => {
            return Err(
                "payload fields `git_username` and `git_token` must be given together".into(),
            )
        }
    };
    let auth_header = creds.map(|(u, t)| {
        redact::add(&t);
        let basic = base64(format!("{u}:{t}").as_bytes());
        redact::add(&basic);
        format!("Authorization: Basic {basic}")
    });
    let branch = p.str("git_branch")?;
    if !branch.is_empty() && !valid_ref_name(branch) {
        return Err(format!(
            "payload field `git_branch`: {branch:?} is not a valid branch name"
        ));
    }
    let dockerfile = relative_dockerfile(p.str("dockerfile_path")?)?;
    p.required("deployment_id")?;
    let project = p.required("project_id")?;
    if !is_uuid(project) {
        return Err(format!(
            "payload field `project_id`: {project:?} is not a UUID"
        ));
    }
    for (id, _) in &secrets {
        let ok = !id.is_empty()
            && id.len() <= 255
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
        if !ok {
            return Err(format!(
                "payload field `build_secrets`: secret id {id:?} may only use A-Z a-z 0-9 _ - ."
            ));
        }
    }
    Ok(Job {
        url,
        branch: branch.to_string(),
        dockerfile,
        project: project.to_ascii_lowercase(),
        auth_header,
        ssh_key: (!ssh_key.trim().is_empty()).then(|| ssh_key.to_string()),
        secrets,
    })
}

/// Allowed: http(s), ssh, git and file URLs, scp-style `[user@]host:path`, and `/path` for a
/// repo hosted by the control plane. Anything else (`-opt`, `ext::cmd`, bare local paths) is
/// refused: git would treat it as an option or run a transport helper.
fn clone_url(raw: &str, control_plane_url: &str) -> Result<String, String> {
    let bad = |why: &str| Err(format!("payload field `git_url`: {raw:?} {why}"));
    if raw.starts_with('-') {
        return bad("must not start with '-'");
    }
    if raw.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return bad("must not contain spaces or control characters");
    }
    if let Some(path) = raw.strip_prefix('/') {
        if path.is_empty() || path.starts_with('/') {
            return bad("is not a hosted repository path like /git/<project>.git");
        }
        return Ok(format!("{}{raw}", control_plane_url.trim_end_matches('/')));
    }
    if let Some((scheme, rest)) = raw.split_once("://") {
        let scheme = scheme.to_ascii_lowercase();
        if !matches!(scheme.as_str(), "https" | "http" | "ssh" | "git" | "file") {
            return bad("has an unsupported scheme (use https, http, ssh, git or file)");
        }
        if rest.is_empty() || (scheme != "file" && rest.starts_with('/')) {
            return bad("has no host");
        }
        return Ok(raw.to_string());
    }
    // scp-style: the part before the first ':' has no '/', the path does not start with ':'.
    if let Some((left, path)) = raw.split_once(':') {
        let (user, host) = match left.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, left),
        };
        let word = |s: &str, extra: &[u8]| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-.".contains(&b) || extra.contains(&b))
        };
        let host_ok = word(host, b"") || (host.starts_with('[') && host.ends_with(']'));
        if host_ok
            && user.map_or(true, |u| word(u, b"_"))
            && !path.is_empty()
            && !path.starts_with(':')
        {
            return Ok(raw.to_string());
        }
    }
    bad("is not a https, http, ssh, git, file or scp-style (user@host:path) URL")
}

/// `http(s)://user:pass@host/x` → (`http(s)://host/x`, (user, pass) percent-decoded).
fn split_userinfo(url: &str) -> (String, Option<(String, String)>) {
    let Some((scheme, rest)) = url.split_once("://") else {
        return (url.to_string(), None);
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((info, host)) if matches!(scheme.to_ascii_lowercase().as_str(), "http" | "https") => {
            let (u, p) = info.split_once(':').unwrap_or((info, ""));
            let (u, p) = (percent_decode(u), percent_decode(p));
            if u.is_empty() || p.is_empty() {
                // A bare user name is no secret; leave such a URL alone.
                return (url.to_string(), None);
            }
            (format!("{scheme}://{host}{path}"), Some((u, p)))
        }
        _ => (url.to_string(), None),
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        match (b[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `git check-ref-format` rules, plus: must not start with '-'.
fn valid_ref_name(b: &str) -> bool {
    b.len() <= 255
        && !b.starts_with('-')
        && !b.starts_with('/')
        && !b.ends_with('/')
        && !b.ends_with('.')
        && b != "@"
        && !b.contains("..")
        && !b.contains("@{")
        && !b.contains("//")
        && !b
            .chars()
            .any(|c| c.is_control() || c == ' ' || "~^:?*[\\".contains(c))
        && b.split('/')
            .all(|c| !c.starts_with('.') && !c.ends_with(".lock"))
}

/// `dockerfile_path` must be relative with no `..`; empty means `Dockerfile`.
fn relative_dockerfile(s: &str) -> Result<PathBuf, String> {
    if s.is_empty() {
        return Ok(PathBuf::from("Dockerfile"));
    }
    let p = Path::new(s);
    let ok = !s.chars().any(char::is_control)
        && p.components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
        && p.components().any(|c| matches!(c, Component::Normal(_)));
    if !ok {
        return Err(format!(
            "payload field `dockerfile_path`: {s:?} must be a relative path inside the repository (no `..`)"
        ));
    }
    Ok(p.to_path_buf())
}

/// After the clone: the Dockerfile must be a file inside it, also after following symlinks.
fn dockerfile_in(src: &Path, rel: &Path) -> Result<PathBuf, String> {
    let shown = rel.display();
    let root = std::fs::canonicalize(src).map_err(|e| format!("clone dir: {e}"))?;
    let full = std::fs::canonicalize(src.join(rel)).map_err(|_| {
        format!("payload field `dockerfile_path`: {shown} does not exist in the repository")
    })?;
    if !full.starts_with(&root) {
        return Err(format!(
            "payload field `dockerfile_path`: {shown} leads outside the repository"
        ));
    }
    if !full.is_file() {
        return Err(format!(
            "payload field `dockerfile_path`: {shown} is not a file"
        ));
    }
    Ok(full)
}

fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

/// Standard padded base64 (no dependency for one header).
fn base64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Shell-quotes one word for GIT_SSH_COMMAND (git runs it through `sh -c`).
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn ssh_command(key: &Path, known_hosts: &Path) -> String {
    format!(
        "ssh -i {} -o IdentitiesOnly=yes -o BatchMode=yes -o StrictHostKeyChecking=accept-new -o UserKnownHostsFile={}",
        sh_quote(&key.to_string_lossy()),
        sh_quote(&known_hosts.to_string_lossy())
    )
}

/// The registry part of the tag: a `http://` or `https://` prefix (accepted by the Go
/// agent's health check) is not part of an image reference.
fn registry_host(addr: &str) -> &str {
    addr.trim()
        .trim_start_matches("https://")
        .trim_start_matches("http://")
        .trim_end_matches('/')
}

/// `sha256:<64 hex>` from a push line: `docker push` prints `<tag>: digest: sha256:… size: N`,
/// buildx `pushing manifest for <tag>@sha256:…`.
fn pushed_digest(line: &str) -> Option<String> {
    if !line.contains("digest: ") && !line.contains("pushing manifest for") {
        return None;
    }
    let i = line.find("sha256:")?;
    let hex = line.get(i + 7..i + 7 + 64)?;
    hex.bytes()
        .all(|b| b.is_ascii_hexdigit())
        .then(|| format!("sha256:{hex}"))
}

/// A private per-build directory under DATA_DIR/builds (0700): the clone, the SSH key and
/// the secret files. Removed on drop, so success, failure, timeout and cancel all clean up.
struct BuildDir(PathBuf);

impl BuildDir {
    fn create(data_dir: &Path, project: &str) -> Result<BuildDir, String> {
        static N: AtomicUsize = AtomicUsize::new(0);
        let root = data_dir.join("builds");
        let err = |e: std::io::Error| format!("build dir {}: {e}", root.display());
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&root)
            .map_err(err)?;
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
        sweep_stale(&root);
        // The pid leads the name so a later start can tell whose leftovers these are.
        let name = format!(
            "{}-{}-{project}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        );
        let dir = root.join(name);
        DirBuilder::new().mode(0o700).create(&dir).map_err(err)?;
        Ok(BuildDir(dir))
    }

    /// Writes a 0600 file that did not exist before.
    fn write_private(&self, name: &str, data: &[u8]) -> Result<PathBuf, String> {
        let path = self.0.join(name);
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        f.write_all(data)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        Ok(path)
    }
}

impl Drop for BuildDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            log::warn!("cannot remove build dir {}: {e}", self.0.display());
        }
    }
}

/// Removes build dirs left by an agent process that no longer runs (killed mid-build).
fn sweep_stale(root: &Path) {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let Ok(rd) = std::fs::read_dir(root) else {
            return;
        };
        for e in rd.flatten() {
            let name = e.file_name();
            let pid = name.to_string_lossy().split('-').next().map(str::to_owned);
            if let Some(pid) = pid.and_then(|p| p.parse::<u32>().ok()) {
                if pid != std::process::id() && !Path::new("/proc").join(pid.to_string()).exists() {
                    log::info!("removing a stale build dir {}", e.path().display());
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
    });
}

pub fn build(ctx: &Ctx) -> Result<String, String> {
    // Our own messages may quote payload values: scrub them like every output line.
    run_build(ctx).map_err(|e| redact::scrub(&e).into_owned())
}

fn run_build(ctx: &Ctx) -> Result<String, String> {
    let job = parse_job(&ctx.task.payload, &ctx.cfg.control_plane_url)?;
    let registry = registry_host(&ctx.cp.registry_addr);
    if registry.is_empty() {
        return Err(
            "no registry_addr in the control plane's agent config: cannot tag the image".into(),
        );
    }
    let _slot = ctx
        .shared
        .build_slots
        .acquire()
        .ok_or("canceled: agent shutting down")?;
    // BUILD_TIMEOUT covers clone, build and push together, from the moment we hold a slot.
    let deadline = Instant::now() + ctx.cfg.build_timeout;
    let docker = ctx.cfg.docker_cli.as_str();
    let mode = build_mode(docker);
    if mode == BuildMode::Legacy && !job.secrets.is_empty() {
        return Err(format!(
            "build_secrets need BuildKit, but {docker} has neither the buildx plugin nor built-in \
             BuildKit (Docker 23+ without docker-buildx): install the buildx plugin"
        ));
    }
    let step = |cmd: Cmd, label: &str| {
        cmd.deadline(deadline, ctx.cfg.build_timeout, "BUILD_TIMEOUT")
            .idle_timeout(ctx.cfg.build_idle_timeout)
            .label(label)
    };

    let dir = BuildDir::create(&ctx.cfg.data_dir, &job.project)?;
    let src = dir.0.join("src");
    let mut git = Cmd::new("git")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_ASKPASS", "")
        // Transport helpers such as ext:: would run arbitrary commands.
        .env("GIT_ALLOW_PROTOCOL", "https:http:ssh:git:file");
    if let Some(h) = &job.auth_header {
        git = git
            .env("GIT_CONFIG_COUNT", "1")
            .env("GIT_CONFIG_KEY_0", "http.extraHeader")
            .env("GIT_CONFIG_VALUE_0", h.as_str());
    }
    if let Some(key) = &job.ssh_key {
        // ssh rejects a key file without the final newline.
        let mut k = key.replace("\r\n", "\n");
        if !k.ends_with('\n') {
            k.push('\n');
        }
        let path = dir.write_private("ssh_key", k.as_bytes())?;
        let known = ctx.cfg.data_dir.join("known_hosts");
        git = git.env("GIT_SSH_COMMAND", ssh_command(&path, &known));
    }
    let secret_files = job
        .secrets
        .iter()
        .enumerate()
        .map(|(i, (id, v))| Ok((id, dir.write_private(&format!("secret-{i}"), v.as_bytes())?)))
        .collect::<Result<Vec<_>, String>>()?;

    let shown_branch = if job.branch.is_empty() {
        "(default branch)"
    } else {
        &job.branch
    };
    ctx.say(&format!("Cloning {}@{shown_branch}...", job.url));
    let mut clone = git.clone().args(["clone", "--depth=1"]);
    if !job.branch.is_empty() {
        clone = clone.args(["--branch", &job.branch]);
    }
    let clone = clone.arg("--").arg(&job.url).arg(&src);
    ctx.run(&step(clone, "git clone"))
        .map_err(|e| e.to_string())?;

    let head = executor::output(&step(
        git.args(["-C"]).arg(&src).args(["rev-parse", "HEAD"]),
        "git rev-parse",
    ))
    .map_err(|e| e.to_string())?;
    let sha = head.stdout.trim();
    let sha12 = sha
        .get(..12)
        .filter(|s| s.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| format!("git rev-parse HEAD: unexpected output {sha:?}"))?;
    ctx.say(&format!("Commit: {sha12}"));
    let dockerfile = dockerfile_in(&src, &job.dockerfile)?;
    let tag = format!("{registry}/{}:{sha12}", job.project);
    ctx.say(&format!("Building image {tag} with {}...", mode.describe()));

    let mut build = Cmd::new(docker);
    build = match mode {
        BuildMode::Buildx => build.args(["buildx", "build"]),
        // Set both ways: an inherited DOCKER_BUILDKIT must not flip the builder.
        BuildMode::BuildKit => build.arg("build").env("DOCKER_BUILDKIT", "1"),
        BuildMode::Legacy => build.arg("build").env("DOCKER_BUILDKIT", "0"),
    };
    build = build
        .args(["--platform", "linux/amd64", "-f"])
        .arg(&dockerfile)
        .args(["-t", &tag]);
    build = match mode {
        BuildMode::Buildx => build.arg("--push"),
        // Failed legacy builds otherwise leave their intermediate containers behind.
        BuildMode::Legacy => build.arg("--force-rm"),
        BuildMode::BuildKit => build,
    };
    for (id, path) in &secret_files {
        build = build
            .arg("--secret")
            .arg(format!("id={id},src={}", path.display()));
    }
    build = build.args(proxy_build_args(ctx)).arg(&src);
    let label = match mode {
        BuildMode::Buildx => "docker buildx build",
        _ => "docker build",
    };
    let mut digest = run_scanning(ctx, &step(build, label))?;

    if mode != BuildMode::Buildx {
        let push = Cmd::new(docker).args(["push", &tag]);
        digest = run_scanning(ctx, &step(push, "docker push"))?;
        if digest.is_none() {
            digest = executor::output(&step(
                Cmd::new(docker).args(["inspect", "--format", "{{index .RepoDigests 0}}", &tag]),
                "docker inspect",
            ))
            .ok()
            .and_then(|o| {
                let s = o.stdout.trim();
                s.rsplit_once('@').map(|(_, d)| d.to_string())
            });
        }
    }
    match digest {
        Some(d) => ctx.say(&format!("Successfully pushed {tag} (digest {d})")),
        None => ctx.say(&format!("Successfully pushed {tag}")),
    }
    Ok(tag)
}

/// `--build-arg NAME` without a value for each proxy variable we have: docker takes the
/// value from its environment, so proxy credentials stay out of argv.
fn proxy_build_args(ctx: &Ctx) -> Vec<String> {
    if !ctx.cfg.builder_proxy_passthrough {
        ctx.say("[proxy] BUILDER_PROXY_PASSTHROUGH is off: no proxy build args");
        return Vec::new();
    }
    let set: Vec<&str> = PROXY_VARS
        .iter()
        .copied()
        .filter(|k| std::env::var(k).is_ok_and(|v| !v.is_empty()))
        .collect();
    if set.is_empty() {
        ctx.say("[proxy] no proxy variables set");
    } else {
        ctx.say(&format!("[proxy] passing {} as build args", set.join(", ")));
    }
    set.iter()
        .flat_map(|k| ["--build-arg".to_string(), k.to_string()])
        .collect()
}

/// Runs a streamed step and returns the pushed digest if its output named one.
fn run_scanning(ctx: &Ctx, cmd: &Cmd) -> Result<Option<String>, String> {
    let mut digest = None;
    executor::run(cmd, &mut |_, line| {
        if digest.is_none() {
            digest = pushed_digest(line);
        }
        (ctx.out)(line)
    })
    .map_err(|e: ExecError| e.to_string())?;
    Ok(digest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const CP: &str = "http://10.0.0.1:8080";

    #[test]
    fn clone_urls() {
        let ok = |u: &str| clone_url(u, CP).unwrap();
        assert_eq!(
            ok("https://github.com/a/b.git"),
            "https://github.com/a/b.git"
        );
        assert_eq!(ok("ssh://git@h:22/a.git"), "ssh://git@h:22/a.git");
        assert_eq!(ok("git@github.com:a/b.git"), "git@github.com:a/b.git");
        assert_eq!(ok("file:///srv/r.git"), "file:///srv/r.git");
        assert_eq!(ok("/git/p.git"), "http://10.0.0.1:8080/git/p.git");
        for bad in [
            "-uhttps://x",
            "--upload-pack=touch /tmp/x",
            "ext::sh -c touch% /tmp/pwned",
            "ext::sh",
            "fd::3",
            "ftp://h/x",
            "//evil/x",
            "relative/path",
            "https://h/a b",
            "",
        ] {
            assert!(clone_url(bad, CP).is_err(), "{bad:?} accepted");
        }
        assert!(clone_url("-x", CP).unwrap_err().contains("`git_url`"));
    }

    #[test]
    fn url_credentials_move_out_of_the_url() {
        assert_eq!(
            split_userinfo("https://bob:p%40ss-url-3c1d@git.example/a.git"),
            (
                "https://git.example/a.git".to_string(),
                Some(("bob".to_string(), "p@ss-url-3c1d".to_string()))
            )
        );
        assert_eq!(
            split_userinfo("ssh://git@h/a.git"),
            ("ssh://git@h/a.git".to_string(), None)
        );
        assert_eq!(
            split_userinfo("https://bob@h/a.git"),
            ("https://bob@h/a.git".to_string(), None)
        );
        let j = parse_job(
            &json!({"git_url": "https://bob:tok-url-5e6f@git.example/a.git",
                    "deployment_id": "d", "project_id": "7a7a7a7a-0000-4000-8000-000000000007"}),
            CP,
        )
        .unwrap();
        assert_eq!(j.url, "https://git.example/a.git");
        assert_eq!(
            j.auth_header.unwrap(),
            format!("Authorization: Basic {}", base64(b"bob:tok-url-5e6f"))
        );
        assert_eq!(redact::scrub("tok-url-5e6f"), "***");
    }

    #[test]
    fn branch_names() {
        for ok in ["main", "feature/x-1", "v1.2.3", "release_2026"] {
            assert!(valid_ref_name(ok), "{ok}");
        }
        for bad in [
            "-b", "a..b", "a b", "a:b", "x.lock", ".hidden", "a/", "/a", "a//b", "@", "a@{1}",
            "a~1", "a^", "a\\b", "a.",
        ] {
            assert!(!valid_ref_name(bad), "{bad}");
        }
    }

    #[test]
    fn dockerfile_paths() {
        assert_eq!(
            relative_dockerfile("").unwrap(),
            PathBuf::from("Dockerfile")
        );
        assert_eq!(
            relative_dockerfile("./docker/Dockerfile.prod").unwrap(),
            PathBuf::from("./docker/Dockerfile.prod")
        );
        for bad in ["../Dockerfile", "a/../../b", "/etc/passwd", ".", "a/.."] {
            let e = relative_dockerfile(bad).unwrap_err();
            assert!(e.contains("`dockerfile_path`"), "{bad}: {e}");
        }
    }

    #[test]
    fn dockerfile_symlink_escape_is_refused() {
        let d = std::env::temp_dir().join(format!("muvee-bld-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("sub")).unwrap();
        std::fs::write(d.join("Dockerfile"), "FROM x\n").unwrap();
        std::os::unix::fs::symlink("/etc/hostname", d.join("out")).unwrap();
        std::os::unix::fs::symlink("../Dockerfile", d.join("sub/in")).unwrap();
        assert!(dockerfile_in(&d, Path::new("Dockerfile")).is_ok());
        assert!(dockerfile_in(&d, Path::new("sub/in")).is_ok());
        assert!(dockerfile_in(&d, Path::new("out"))
            .unwrap_err()
            .contains("outside"));
        assert!(dockerfile_in(&d, Path::new("sub"))
            .unwrap_err()
            .contains("not a file"));
        assert!(dockerfile_in(&d, Path::new("nope"))
            .unwrap_err()
            .contains("does not exist"));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn payload_validation_names_fields_and_registers_secrets() {
        let base = json!({
            "git_url": "https://git.example/a.git", "git_branch": "", "dockerfile_path": "",
            "deployment_id": "d", "project_id": "7A7A7A7A-0000-4000-8000-000000000007",
            "git_username": "agent", "git_token": "tok-unit-9f2c",
            "build_secrets": {"api_key": "sec-unit-77aa"}
        });
        let j = parse_job(&base, CP).unwrap();
        assert_eq!(j.project, "7a7a7a7a-0000-4000-8000-000000000007");
        assert_eq!(j.dockerfile, PathBuf::from("Dockerfile"));
        assert_eq!(
            j.auth_header.as_deref(),
            Some(format!("Authorization: Basic {}", base64(b"agent:tok-unit-9f2c")).as_str())
        );
        assert_eq!(redact::scrub("x tok-unit-9f2c sec-unit-77aa"), "x *** ***");
        assert_eq!(redact::scrub(&base64(b"agent:tok-unit-9f2c")), "***");
        let with = |k: &str, v: serde_json::Value| {
            let mut p = base.clone();
            p[k] = v;
            parse_job(&p, CP).unwrap_err()
        };
        assert!(with("git_url", json!(null)).contains("`git_url` is required"));
        assert!(with("project_id", json!("../x")).contains("`project_id`"));
        assert!(with("deployment_id", json!("")).contains("`deployment_id`"));
        assert!(with("git_branch", json!("--upload-pack=x")).contains("`git_branch`"));
        assert!(with("git_token", json!("")).contains("`git_token`"));
        assert!(with("build_secrets", json!({"a,b": "x"})).contains("`build_secrets`"));
        assert!(with("build_secrets", json!({"a": 1})).contains("`build_secrets.a`"));
    }

    #[test]
    fn helpers() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"agent:s3cret"), "YWdlbnQ6czNjcmV0");
        assert_eq!(
            ssh_command(Path::new("/d/it's/key"), Path::new("/d/known_hosts")),
            "ssh -i '/d/it'\\''s/key' -o IdentitiesOnly=yes -o BatchMode=yes -o StrictHostKeyChecking=accept-new -o UserKnownHostsFile='/d/known_hosts'"
        );
        assert_eq!(registry_host("http://r.example:5000/"), "r.example:5000");
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
        assert!(is_uuid("7a7a7a7a-0000-4000-8000-000000000007"));
        assert!(!is_uuid("7a7a7a7a-0000-4000-8000-00000000000g"));
    }
}
