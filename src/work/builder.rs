//! Builder role: clone, build and push an image.
//!
//! Unlike the Go agent, credentials never reach argv or the clone URL (HTTPS tokens go in
//! through GIT_CONFIG_* env, build secrets and the SSH key through 0600 files in a private
//! dir), SSH host keys are trusted on first use instead of not checked, every input is
//! validated before anything runs, and the clone dir, key and secret files are removed
//! however the build ends.

use crate::config::Config;
use crate::sys::docker::{BuildMode, BuildSpec};
use crate::sys::executor::{Deadline, Limits};
use crate::sys::git::{valid_ref_name, Git};
use crate::sys::redact::Scope;
use crate::sys::sync::{random_u64, FileLock};
use crate::task::{Invalid, Payload};
use crate::work::ctx::{Ctx, Shared};
use crate::work::error::TaskError;
use crate::work::gitcache;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use percent_encoding::percent_decode_str;
use std::ffi::OsString;
use std::fs::{DirBuilder, OpenOptions, Permissions};
use std::io::Write;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Instant;

/// The tag of each project's layer cache (the image of its last build).
const CACHE_TAG: &str = "buildcache";

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

/// Where to clone from and with which credentials: the payload fields `git_url`,
/// `git_branch`, `git_username`/`git_token` and `git_ssh_key`, shared by builds and compose
/// deploys so both clone the same safe way.
#[derive(Debug)]
pub struct GitSource {
    /// What git clones (hosted paths already prefixed with CONTROL_PLANE_URL).
    pub url: String,
    pub branch: String,
    /// `Authorization: Basic ...` for HTTP(S) clones.
    auth_header: Option<String>,
    ssh_key: Option<String>,
}

impl GitSource {
    /// Everything the clone authenticates with (None: nothing), for the git cache to keep
    /// builds with different credentials apart.
    fn credentials(&self) -> Option<String> {
        match (&self.auth_header, &self.ssh_key) {
            (None, None) => None,
            (h, k) => Some(format!(
                "{}\0{}",
                h.as_deref().unwrap_or(""),
                k.as_deref().unwrap_or("")
            )),
        }
    }
}

/// A validated build payload.
#[derive(Debug)]
struct Job {
    git: GitSource,
    dockerfile: PathBuf,
    project: String,
    secrets: Vec<(String, String)>,
}

/// Reads and validates the payload. Secrets are registered for redaction first, so even a
/// validation message cannot carry one.
fn parse_job(
    payload: &serde_json::Value,
    control_plane_url: &str,
    secrets: &Scope,
) -> Result<Job, TaskError> {
    let p = Payload::of(payload)?;
    let scope = secrets;
    let secrets = p.string_map("build_secrets")?;
    for (_, v) in &secrets {
        scope.add(v);
    }
    let git = git_source(&p, control_plane_url, scope)?;
    let dockerfile = relative_path(p.str("dockerfile_path")?, "dockerfile_path", "Dockerfile")?;
    p.required("deployment_id")?;
    let project = p.required("project_id")?;
    if !is_uuid(project) {
        return Err(TaskError::Invalid(format!(
            "payload field `project_id`: {project:?} is not a UUID"
        )));
    }
    for (id, _) in &secrets {
        let ok = !id.is_empty()
            && id.len() <= 255
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
        if !ok {
            return Err(TaskError::Invalid(format!(
                "payload field `build_secrets`: secret id {id:?} may only use A-Z a-z 0-9 _ - ."
            )));
        }
    }
    Ok(Job {
        git,
        dockerfile,
        project: project.to_ascii_lowercase(),
        secrets,
    })
}

/// Reads and validates the git fields; the token and key are registered for redaction first.
pub fn git_source(
    p: &Payload,
    control_plane_url: &str,
    scope: &Scope,
) -> Result<GitSource, TaskError> {
    let user = p.str("git_username")?;
    let token = p.str("git_token")?;
    let ssh_key = p.str("git_ssh_key")?;
    scope.add(token);
    scope.add(ssh_key);
    // Credentials written into an http(s) URL move to the header as well: never in argv.
    let (url, url_creds) = split_userinfo(&clone_url(p.required("git_url")?, control_plane_url)?);
    let creds = match (user.is_empty(), token.is_empty()) {
        (true, true) => url_creds,
        (false, false) => Some((user.to_string(), token.to_string())),
        _ => {
            return Err(TaskError::Invalid(
                "payload fields `git_username` and `git_token` must be given together".into(),
            ))
        }
    };
    let auth_header = creds.map(|(u, t)| {
        scope.add(&t);
        let basic = BASE64.encode(format!("{u}:{t}"));
        scope.add(&basic);
        format!("Authorization: Basic {basic}")
    });
    let branch = p.str("git_branch")?;
    if !branch.is_empty() && !valid_ref_name(branch) {
        return Err(TaskError::Invalid(format!(
            "payload field `git_branch`: {branch:?} is not a valid branch name"
        )));
    }
    Ok(GitSource {
        url,
        branch: branch.to_string(),
        auth_header,
        ssh_key: (!ssh_key.trim().is_empty()).then(|| ssh_key.to_string()),
    })
}

/// Allowed: http(s), ssh, git and file URLs, scp-style `[user@]host:path`, and `/path` for a
/// repo hosted by the control plane. Anything else (`-opt`, `ext::cmd`, bare local paths) is
/// refused: git would treat it as an option or run a transport helper.
fn clone_url(raw: &str, control_plane_url: &str) -> Result<String, Invalid> {
    let bad = |why: &str| Err(Invalid(format!("payload field `git_url`: {raw:?} {why}")));
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
        if scheme.starts_with("http") && !valid_http_url(raw) {
            // Likely credentials with a reserved character (a '/' in a token): never quote
            // them, and never hand such a URL to git.
            let shown = match raw.rsplit_once('@') {
                Some((_, host)) => format!("{scheme}://***@{host}"),
                None => raw.to_string(),
            };
            return Err(Invalid(format!(
                "payload field `git_url`: {shown:?} is not a valid URL (percent-encode reserved characters in credentials, e.g. '/' as %2F)"
            )));
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

/// Parses as a URI and, if it names a port, the port is a number: `https://bob:tok/en@h`
/// (a token with an unencoded '/') is host `bob` with port `tok`, which git cannot use.
fn valid_http_url(raw: &str) -> bool {
    let Ok(uri) = raw.parse::<http::Uri>() else {
        return false;
    };
    let Some(a) = uri.authority() else {
        return false;
    };
    let hostport = a.as_str().rsplit_once('@').map_or(a.as_str(), |(_, h)| h);
    let after_host = hostport.rsplit_once(']').map_or(hostport, |(_, rest)| rest);
    !after_host.contains(':') || a.port_u16().is_some()
}

/// `http(s)://user:pass@host/x` → (`http(s)://host/x`, (user, pass) percent-decoded).
fn split_userinfo(url: &str) -> (String, Option<(String, String)>) {
    let unchanged = (url.to_string(), None);
    let Ok(uri) = url.parse::<http::Uri>() else {
        return unchanged;
    };
    let (Some(scheme), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
        return unchanged;
    };
    let Some((info, host)) = authority.as_str().rsplit_once('@') else {
        return unchanged;
    };
    if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
        return unchanged;
    }
    let decode = |s: &str| percent_decode_str(s).decode_utf8_lossy().into_owned();
    let (u, p) = info.split_once(':').unwrap_or((info, ""));
    let (u, p) = (decode(u), decode(p));
    if u.is_empty() || p.is_empty() {
        // A bare user name is no secret; leave such a URL alone.
        return unchanged;
    }
    let path = uri.path_and_query().map_or("", |pq| pq.as_str());
    let path = if url.ends_with(path) { path } else { "" };
    (format!("{scheme}://{host}{path}"), Some((u, p)))
}

/// A path inside the repository (`dockerfile_path`, `compose_file_path`): relative with no
/// `..`; empty means `default`.
pub fn relative_path(s: &str, field: &str, default: &str) -> Result<PathBuf, Invalid> {
    if s.is_empty() {
        return Ok(PathBuf::from(default));
    }
    let p = Path::new(s);
    let ok = !s.chars().any(char::is_control)
        && p.components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
        && p.components().any(|c| matches!(c, Component::Normal(_)));
    if !ok {
        return Err(Invalid(format!(
            "payload field `{field}`: {s:?} must be a relative path inside the repository (no `..`)"
        )));
    }
    Ok(p.to_path_buf())
}

/// After the clone: the Dockerfile must be a file inside it, also after following symlinks.
fn dockerfile_in(src: &Path, rel: &Path) -> Result<PathBuf, TaskError> {
    file_in(src, rel, "dockerfile_path")
}

/// `rel` (payload field `field`) must be a file inside `src`, also after following symlinks.
pub fn file_in(src: &Path, rel: &Path, field: &str) -> Result<PathBuf, TaskError> {
    let shown = rel.display();
    let bad = |why: &str| TaskError::Invalid(format!("payload field `{field}`: {shown} {why}"));
    let root = std::fs::canonicalize(src).map_err(TaskError::io("clone dir"))?;
    let full = std::fs::canonicalize(src.join(rel))
        .map_err(|_| bad("does not exist in the repository"))?;
    if !full.starts_with(&root) {
        return Err(bad("leads outside the repository"));
    }
    if !full.is_file() {
        return Err(bad("is not a file"));
    }
    Ok(full)
}

pub fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
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

/// A private per-build directory under DATA_DIR/builds (0700): the clone, the SSH key and
/// the secret files. Removed on drop, so success, failure, timeout and cancel all clean up.
struct BuildDir(PathBuf);

impl BuildDir {
    fn create(ctx: &Ctx, project: &str) -> Result<BuildDir, TaskError> {
        let root = builds_root(&ctx.cfg.data_dir)?;
        let owner = owner_id(ctx)?;
        sweep_stale(&ctx.cfg.data_dir, &owner);
        let seq = ctx.shared.build_seq.fetch_add(1, Ordering::SeqCst);
        let dir = root.join(format!("{owner}-{seq}-{project}"));
        let err = TaskError::io(format!("build dir {}", dir.display()));
        DirBuilder::new().mode(0o700).create(&dir).map_err(err)?;
        Ok(BuildDir(dir))
    }

    /// Writes a 0600 file that did not exist before.
    fn write_private(&self, name: &str, data: &[u8]) -> Result<PathBuf, TaskError> {
        write_private(&self.0, name, data)
    }
}

/// Writes a 0600 file `dir/name` that did not exist before.
pub fn write_private(dir: &Path, name: &str, data: &[u8]) -> Result<PathBuf, TaskError> {
    let path = dir.join(name);
    let err = TaskError::io(format!("cannot write {}", path.display()));
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .and_then(|mut f| f.write_all(data))
        .map_err(err)?;
    Ok(path)
}

impl Drop for BuildDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            log::warn!("cannot remove build dir {}: {e}", self.0.display());
        }
    }
}

/// DATA_DIR/builds, private (0700).
fn builds_root(data_dir: &Path) -> Result<PathBuf, TaskError> {
    let root = data_dir.join("builds");
    let err = TaskError::io(format!("build dir {}", root.display()));
    let made = DirBuilder::new().recursive(true).mode(0o700).create(&root);
    made.and_then(|()| std::fs::set_permissions(&root, Permissions::from_mode(0o700)))
        .map_err(err)?;
    Ok(root)
}

/// Where each agent process keeps the lock that says it is alive.
fn owners_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("state/build-owners")
}

/// This process's id: `state/build-owners/<id>.lock` stays flock'ed while the process lives,
/// so its build dirs `builds/<id>-<n>-<project>` are told from a dead one's without a PID
/// (in a container the agent is PID 1 on every start).
fn owner_id(ctx: &Ctx) -> Result<String, TaskError> {
    let mut owner = ctx
        .shared
        .build_owner
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some((id, _)) = &*owner {
        return Ok(id.clone());
    }
    let id = format!("{:016x}", random_u64());
    let dir = owners_dir(&ctx.cfg.data_dir);
    let path = dir.join(format!("{id}.lock"));
    let lock = crate::cp::files::private_dir(&dir)
        .and_then(|()| FileLock::create(&path))
        .map_err(TaskError::io(path.display()))?;
    *owner = Some((id.clone(), lock));
    Ok(id)
}

/// Removes the build dirs (clones, keys, secret files) of agent processes that are gone:
/// their lock is free, or they never had one (older agents named dirs by PID).
pub fn sweep_stale(data_dir: &Path, own: &str) {
    // The dirs first: an agent takes its lock before it makes a dir, so every dir listed here
    // has its owner's lock in the list below (listed the other way round, another process
    // starting meanwhile would lose its new dir).
    let root = data_dir.join("builds");
    let dirs: Vec<String> = names(&root).collect();
    let owners = owners_dir(data_dir);
    let locks: Vec<String> = names(&owners)
        .filter_map(|n| n.strip_suffix(".lock").map(String::from))
        .collect();
    let alive = |id: &str| {
        id == own
            || !matches!(
                FileLock::try_open(&owners.join(format!("{id}.lock"))),
                Ok(Some(_))
            )
    };
    let (live, dead): (Vec<&String>, Vec<&String>) = locks.iter().partition(|id| alive(id));
    for name in dirs {
        let id = name.split('-').next().unwrap_or("");
        if id != own && !live.iter().any(|l| l.as_str() == id) {
            log::info!("removing a stale build dir {}", root.join(&name).display());
            let _ = std::fs::remove_dir_all(root.join(&name));
        }
    }
    for id in dead {
        let _ = std::fs::remove_file(owners.join(format!("{id}.lock")));
    }
}

fn names(dir: &Path) -> impl Iterator<Item = String> {
    let rd = std::fs::read_dir(dir).into_iter().flatten().flatten();
    rd.map(|e| e.file_name().to_string_lossy().into_owned())
}

/// At start: what builds of a killed agent left behind goes at once, not at the next build.
pub fn sweep_at_start(cfg: &Config) {
    sweep_stale(&cfg.data_dir, "");
}

/// The build mode of this process: probed on the first build (or at start), then kept.
pub fn build_mode(ctx_shared: &Shared, cfg: &Config) -> BuildMode {
    *ctx_shared.build_mode.get_or_init(|| {
        let m = ctx_shared.docker(cfg).detect_build_mode();
        log::info!("builder: {} builds with {}", cfg.docker_cli, m.describe());
        m
    })
}

/// `build`: clone, build and push; returns the pushed tag.
pub fn build(ctx: &Ctx) -> Result<String, TaskError> {
    let job = parse_job(
        &ctx.task.payload,
        ctx.cfg.control_plane_url.as_str(),
        ctx.secrets,
    )?;
    let registry = registry_host(&ctx.cp.registry_addr);
    if registry.is_empty() {
        return Err(TaskError::Invalid(
            "no registry_addr in the control plane's agent config: cannot tag the image".into(),
        ));
    }
    let _slot = ctx.shared.build_slots.acquire()?;
    // BUILD_TIMEOUT covers clone, build and push together, from the moment we hold a slot.
    let limits = Limits {
        deadline: Some(Deadline {
            at: Instant::now() + ctx.cfg.build_timeout,
            total: ctx.cfg.build_timeout,
            setting: "BUILD_TIMEOUT",
        }),
        idle: Some(ctx.cfg.build_idle_timeout),
    };
    let mode = build_mode(ctx.shared, ctx.cfg);
    if mode == BuildMode::Legacy && !job.secrets.is_empty() {
        return Err(TaskError::Unsupported(format!(
            "build_secrets need BuildKit, but {} has neither the buildx plugin nor built-in \
             BuildKit (Docker 23+ without docker-buildx): install the buildx plugin",
            ctx.cfg.docker_cli
        )));
    }
    let dir = BuildDir::create(ctx, &job.project)?;
    let src = dir.0.join("src");
    let (sha12, fresh) = checkout(ctx, &job, &dir, &src, limits)?;
    let dockerfile = dockerfile_in(&src, &job.dockerfile)?;
    let tag = format!("{registry}/{}:{sha12}", job.project);
    // A moving tag per project: the image the last build pushed, whichever node built it.
    let cache = format!("{registry}/{}:{CACHE_TAG}", job.project);
    ctx.say(&format!("Building image {tag} with {}...", mode.describe()));
    let secret_files = job
        .secrets
        .iter()
        .enumerate()
        .map(|(i, (id, v))| {
            Ok((
                id.clone(),
                dir.write_private(&format!("secret-{i}"), v.as_bytes())?,
            ))
        })
        .collect::<Result<Vec<_>, TaskError>>()?;
    let build_args = proxy_build_args(ctx);
    let spec = BuildSpec {
        mode,
        dockerfile: &dockerfile,
        context: &src,
        tag: &tag,
        secrets: &secret_files,
        build_args: &build_args,
        cache: Some(&cache),
    };
    let digest = build_and_push(ctx, &spec, limits);
    if let Some(f) = fresh {
        f.settle(ctx);
    }
    let digest = digest?;
    match digest {
        Some(d) => ctx.say(&format!("Successfully pushed {tag} (digest {d})")),
        None => ctx.say(&format!("Successfully pushed {tag}")),
    }
    Ok(tag)
}

/// Checks the job's branch out into `src` (through the git cache unless GIT_CACHE_MAX is 0)
/// and returns the commit's first 12 hex digits, and a new cache entry to settle.
fn checkout(
    ctx: &Ctx,
    job: &Job,
    dir: &BuildDir,
    src: &Path,
    limits: Limits,
) -> Result<(String, Option<gitcache::Fresh>), TaskError> {
    let mut fresh = None;
    let git = if ctx.cfg.git_cache_max == 0 {
        clone_source(ctx, &job.git, &dir.0, src, limits)?
    } else {
        let git = git_for(ctx, &job.git, &dir.0)?;
        let cred = gitcache::fingerprint(job.git.credentials().as_deref());
        let repo = (job.git.url.as_str(), cred.as_str());
        fresh = gitcache::checkout(ctx, git, repo, &job.git.branch, src, limits)?;
        Git::new(&*ctx.shared.runner)
    };
    let sha = git.head(src, limits)?;
    let sha12 = sha
        .get(..12)
        .filter(|s| s.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| {
            TaskError::Failed(format!("git rev-parse HEAD: unexpected output {sha:?}"))
        })?;
    ctx.say(&format!("Commit: {sha12}"));
    Ok((sha12.to_string(), fresh))
}

/// Clones `source` shallowly into `dest`; an SSH key goes to a 0600 file in the private
/// `key_dir` (the caller removes it). Returns the configured git for later calls.
pub fn clone_source<'a>(
    ctx: &'a Ctx,
    source: &GitSource,
    key_dir: &Path,
    dest: &Path,
    limits: Limits,
) -> Result<Git<'a>, TaskError> {
    let git = git_for(ctx, source, key_dir)?;
    git.clone_shallow(&source.url, &source.branch, dest, limits, &mut |l| {
        (ctx.out)(l)
    })?;
    Ok(git)
}

/// Git with `source`'s credentials (an SSH key goes to a 0600 file in the private `key_dir`,
/// which the caller removes), after saying what it clones.
fn git_for<'a>(ctx: &'a Ctx, source: &GitSource, key_dir: &Path) -> Result<Git<'a>, TaskError> {
    refuse_data_dir(&source.url, &ctx.cfg.data_dir)?;
    let mut git = Git::new(&*ctx.shared.runner);
    if let Some(h) = &source.auth_header {
        git = git.header(h);
    }
    if let Some(key) = &source.ssh_key {
        // ssh rejects a key file without the final newline.
        let mut k = key.replace("\r\n", "\n");
        if !k.ends_with('\n') {
            k.push('\n');
        }
        let path = write_private(key_dir, "ssh_key", k.as_bytes())?;
        let known = ctx.cfg.data_dir.join("known_hosts");
        git = git.ssh_command(ssh_command(&path, &known));
    }
    let shown_branch = if source.branch.is_empty() {
        "(default branch)"
    } else {
        &source.branch
    };
    ctx.say(&format!("Cloning {}@{shown_branch}...", source.url));
    Ok(git)
}

/// A `file://` URL naming a path inside DATA_DIR (the git cache of other builds, datasets,
/// keys) is refused: a build reads only what its own URL and credentials reach.
fn refuse_data_dir(url: &str, data_dir: &Path) -> Result<(), TaskError> {
    let Some(rest) = url
        .get(..7)
        .filter(|s| s.eq_ignore_ascii_case("file://"))
        .map(|_| &url[7..])
    else {
        return Ok(());
    };
    // git ignores a host part, decodes %XX and also tries PATH.git.
    let path = &rest[rest.find('/').unwrap_or(rest.len())..];
    let path = PathBuf::from(OsString::from_vec(percent_decode_str(path).collect()));
    let mut with_git = path.clone().into_os_string();
    with_git.push(".git");
    let data = resolved(data_dir);
    let inside = [path.clone(), with_git.into()]
        .iter()
        .any(|p| resolved(p).starts_with(&data));
    if inside || path.components().any(|c| c == Component::ParentDir) {
        return Err(TaskError::Invalid(format!(
            "payload field `git_url`: {url:?} is refused: a local repository must be outside the agent's DATA_DIR and its path must not contain '..'"
        )));
    }
    Ok(())
}

/// `p` with symlinks and `..` resolved as far as it exists; the rest appended as given.
fn resolved(p: &Path) -> PathBuf {
    let mut head = p.to_path_buf();
    let mut tail = Vec::new();
    loop {
        if let Ok(real) = head.canonicalize() {
            return tail.iter().rev().fold(real, |acc, n| acc.join(n));
        }
        match (head.file_name().map(|n| n.to_os_string()), head.parent()) {
            (Some(n), Some(parent)) => {
                tail.push(n);
                head = parent.to_path_buf();
            }
            // Nothing left that exists (a relative path, or `..`): what was given.
            _ => return p.to_path_buf(),
        }
    }
}

/// Builds (and with buildx pushes) the image; otherwise pushes it. Returns the digest.
fn build_and_push(
    ctx: &Ctx,
    spec: &BuildSpec,
    limits: Limits,
) -> Result<Option<String>, TaskError> {
    let docker = ctx.docker();
    let out = &mut |l: &str| (ctx.out)(l);
    let mut digest = docker.build_step(docker.build_cmd(spec), limits, out)?;
    if spec.mode != BuildMode::Buildx {
        digest = docker.build_step(docker.push_cmd(spec.tag), limits, out)?;
        if digest.is_none() {
            digest = docker.repo_digest(spec.tag, limits);
        }
    }
    if let (Some(cache), BuildMode::BuildKit) = (spec.cache, spec.mode) {
        // Only a manifest travels (the layers are there); without it the next build on
        // another node just has less cache.
        if let Err(e) = docker.build_step(docker.push_cmd(cache), limits, out) {
            ctx.say(&format!("The layer cache tag {cache} was not pushed: {e}"));
        }
    }
    Ok(digest)
}

/// `--build-arg NAME` without a value for each proxy variable we have: docker takes the
/// value from its environment, so proxy credentials stay out of argv.
fn proxy_build_args(ctx: &Ctx) -> Vec<&'static str> {
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
    set
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_url_into_data_dir_is_refused() {
        let d = crate::sys::fake::temp_dir("refuse-data-dir");
        let (data, other) = (d.join("data"), d.join("repos"));
        std::fs::create_dir_all(data.join("git/k/repo")).unwrap();
        std::fs::create_dir_all(&other).unwrap();
        std::os::unix::fs::symlink(&data, other.join("via-link")).unwrap();
        let refused = |u: String| match refuse_data_dir(&u, &data) {
            Err(TaskError::Invalid(m)) => m.contains("`git_url`"),
            _ => false,
        };
        let (dd, od) = (data.display(), other.display());
        for u in [
            format!("file://{dd}/git/k/repo"),
            format!("FILE://localhost{dd}/git/k/repo"),
            format!("file://{dd}/git/k/re%70o"),
            format!("file://{dd}/git/k/not-yet"),
            format!("file://{dd}"),
            format!("file://{od}/via-link/git/k/repo"),
            format!("file://{od}/../data/git/k/repo"),
        ] {
            assert!(refused(u.clone()), "{u}");
        }
        for u in [
            format!("file://{od}/app.git"),
            format!("file://{dd}-other/app.git"),
            format!("https://h{dd}/git/k/repo"),
        ] {
            assert!(refuse_data_dir(&u, &data).is_ok(), "{u}");
        }
        let _ = std::fs::remove_dir_all(&d);
    }
    use crate::sys::fake::Reply;
    use crate::work::ctx::testing::Harness;
    use crate::work::dispatch;
    use serde_json::json;
    use std::sync::Arc;

    const CP: &str = "http://10.0.0.1:8080";
    const SHA: &str = "0123456789abcdef0123456789abcdef01234567";
    const PROJECT: &str = "7a7a7a7a-0000-4000-8000-000000000007";

    /// A builder host where every step succeeds (BuildKit without buildx, unless `buildx`).
    /// It clones without the git cache (the integration tests run that with real git).
    fn host(name: &str, buildx: bool) -> Harness {
        let mut h = Harness::new(name, &[("NODE_ROLE", "builder"), ("GIT_CACHE_MAX", "0")]);
        h.cp.registry_addr = "reg.example:5000".into();
        let f = &h.fake;
        let probe = if buildx {
            Reply::Ok("v0.10".into())
        } else {
            Reply::Fail(1, "unknown".into())
        };
        f.on("docker buildx version", probe);
        f.on(
            "docker build --help",
            Reply::Ok("      --secret stringArray".into()),
        );
        // The clone leaves a repository with a Dockerfile behind, as git would.
        f.on(
            "git clone",
            Reply::With(Arc::new(|cmd| {
                let dest = std::path::PathBuf::from(cmd.args.last().unwrap());
                std::fs::create_dir_all(&dest).unwrap();
                std::fs::write(dest.join("Dockerfile"), "FROM scratch\n").unwrap();
                Ok("Cloning into 'src'...".into())
            })),
        );
        f.on("git -C", Reply::Ok(SHA.into()));
        let digest = format!("1: digest: sha256:{} size: 527", "a".repeat(64));
        f.on("docker push", Reply::Ok(digest));
        h
    }

    fn build_with(h: &Harness, extra: serde_json::Value) -> Result<String, TaskError> {
        let mut p = json!({"git_url": "https://git.example/a.git", "git_branch": "main",
                           "deployment_id": "d", "project_id": PROJECT});
        if let (Some(p), Some(extra)) = (p.as_object_mut(), extra.as_object()) {
            p.extend(extra.clone());
        }
        let r = h.with("build", p, build);
        let left = std::fs::read_dir(h.cfg.data_dir.join("builds")).map_or(0, |d| d.count());
        assert_eq!(left, 0, "a build dir outlived its build");
        r
    }

    fn text(r: &Result<String, TaskError>) -> String {
        match r {
            Ok(t) => format!("ok {t}"),
            Err(e) => dispatch::report(e).result.unwrap_or_default(),
        }
    }

    #[test]
    fn a_build_clones_builds_and_pushes_in_order() {
        let h = host("bld-ok", false);
        let tag = build_with(&h, json!({})).unwrap();
        assert_eq!(tag, format!("reg.example:5000/{PROJECT}:0123456789ab"));
        let calls = h.fake.calls();
        let pos = |p: &str| calls.iter().position(|c| c.starts_with(p)).unwrap();
        assert!(
            pos("git clone --depth=1 --branch main -- https://git.example/a.git") < pos("git -C")
        );
        assert!(pos("git -C") < pos("docker build --platform linux/amd64 -f"));
        let cache = format!("reg.example:5000/{PROJECT}:buildcache");
        let build = h.fake.ran("docker build --platform");
        let inline = format!("-t {cache} --cache-from {cache} --build-arg BUILDKIT_INLINE_CACHE=1");
        assert!(
            build[0].contains(&format!("-t {tag} {inline} /")),
            "{build:?}"
        );
        assert!(pos("docker build --platform") < pos(&format!("docker push {tag}")));
        assert!(pos(&format!("docker push {tag}")) < pos(&format!("docker push {cache}")));
        assert!(h.said().contains(&format!(
            "Successfully pushed {tag} (digest sha256:{})",
            "a".repeat(64)
        )));

        let h = host("bld-buildx", true);
        let tag = build_with(&h, json!({})).unwrap();
        let build = h.fake.ran("docker buildx build");
        let from = format!("--cache-from type=registry,ref={cache} --cache-to type=inline");
        let want = format!("-t {tag} -t {cache} {from} --push /");
        assert!(build[0].contains(&want), "{build:?}");
        assert!(h.fake.ran("docker push").is_empty());
    }

    #[test]
    fn a_failed_push_of_the_cache_tag_does_not_fail_the_build() {
        let h = host("bld-cache-push", false);
        let cache = format!("reg.example:5000/{PROJECT}:buildcache");
        h.fake.on(
            &format!("docker push {cache}"),
            Reply::Fail(1, "denied: quota".into()),
        );
        let tag = build_with(&h, json!({})).unwrap();
        assert!(h.said().contains(&format!("Successfully pushed {tag}")));
        let said = format!("The layer cache tag {cache} was not pushed: docker push exited 1");
        assert!(h.said().contains(&said), "{}", h.said());
        // The legacy builder takes no cache arguments and pushes no cache tag.
        let h = host("bld-cache-legacy", false);
        h.fake.on("docker build --help", Reply::Ok("legacy".into()));
        build_with(&h, json!({})).unwrap();
        assert!(!h.fake.calls().join("\n").contains("buildcache"));
    }

    #[test]
    fn a_failure_at_each_build_step_stops_what_follows() {
        let cases = [
            (
                "git clone",
                Reply::Fail(128, "fatal: repository not found".into()),
                "git clone exited 128: fatal: repository not found",
                "docker build --platform",
            ),
            (
                "git -C",
                Reply::Ok("not-a-sha".into()),
                "git rev-parse HEAD: unexpected output \"not-a-sha\"",
                "docker build --platform",
            ),
            (
                "docker build --platform",
                Reply::Fail(1, "#5 ERROR: failed to solve".into()),
                "docker build exited 1: #5 ERROR: failed to solve",
                "docker push",
            ),
            (
                "docker push",
                Reply::Fail(
                    1,
                    "denied: requested access to the resource is denied".into(),
                ),
                "docker push exited 1: denied",
                "docker inspect",
            ),
            (
                "git clone",
                Reply::Canceled,
                "canceled: agent shutting down",
                "git -C",
            ),
        ];
        for (i, (step, reply, expect, not_run)) in cases.into_iter().enumerate() {
            let h = host(&format!("bld-fail-{i}"), false);
            h.fake.on(step, reply);
            let r = build_with(&h, json!({}));
            assert!(text(&r).starts_with(expect), "{step}: {}", text(&r));
            assert!(
                h.fake.ran(not_run).is_empty(),
                "{step}: {:#?}",
                h.fake.calls()
            );
        }
    }

    #[test]
    fn a_push_without_a_digest_line_asks_the_engine() {
        let h = host("bld-digest", false);
        h.fake.on("docker push", Reply::Ok("pushed".into()));
        let d = format!("reg.example:5000/p@sha256:{}", "b".repeat(64));
        h.fake.on(
            "docker inspect --format {{index .RepoDigests 0}}",
            Reply::Ok(d),
        );
        build_with(&h, json!({})).unwrap();
        assert!(
            h.said()
                .contains(&format!("(digest sha256:{})", "b".repeat(64))),
            "{}",
            h.said()
        );
    }

    #[test]
    fn refused_builds_run_nothing_they_should_not() {
        // Build secrets with only the legacy builder: refused before the clone.
        let h = host("bld-legacy", false);
        h.fake
            .on("docker build --help", Reply::Ok("legacy help".into()));
        let r = build_with(&h, json!({"build_secrets": {"k": "sec-unit-legacy"}}));
        assert!(
            text(&r).starts_with("build_secrets need BuildKit"),
            "{}",
            text(&r)
        );
        assert!(h.fake.ran("git").is_empty());
        // A Dockerfile the clone does not have: nothing is built.
        let h = host("bld-nofile", false);
        let r = build_with(&h, json!({"dockerfile_path": "docker/Dockerfile.prod"}));
        assert_eq!(text(&r), "payload field `dockerfile_path`: docker/Dockerfile.prod does not exist in the repository");
        assert!(h.fake.ran("docker build --platform").is_empty());
        // Credentials reach git through its environment, never argv.
        let h = host("bld-token", false);
        build_with(
            &h,
            json!({"git_username": "u", "git_token": "tok-fake-5d1e"}),
        )
        .unwrap();
        assert!(!h.fake.calls().join(" ").contains("tok-fake-5d1e"));
        assert!(!h
            .fake
            .calls()
            .join(" ")
            .contains(&BASE64.encode("u:tok-fake-5d1e")));
    }

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
        assert!(clone_url("-x", CP)
            .unwrap_err()
            .to_string()
            .contains("`git_url`"));
        // An unencoded '/' in a token: refused without quoting the token.
        let e = clone_url("https://bob:tok/en-77c1@git.example/x.git", CP)
            .unwrap_err()
            .0;
        assert!(
            e.contains("\"https://***@git.example/x.git\" is not a valid URL"),
            "{e}"
        );
        assert!(!e.contains("en-77c1"));
        assert!(clone_url("https://bob:tok@git.example:8443/x.git", CP).is_ok());
        assert!(clone_url("https://[::1]:8443/x.git", CP).is_ok());
        let decoded = split_userinfo("https://bob:p%2Fss@h/a.git").1;
        assert_eq!(decoded, Some(("bob".into(), "p/ss".into())));
    }

    #[test]
    fn url_credentials_move_out_of_the_url() {
        let scope = Scope::new();
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
            &scope,
        )
        .unwrap();
        assert_eq!(j.git.url, "https://git.example/a.git");
        assert_eq!(
            j.git.auth_header.unwrap(),
            format!(
                "Authorization: Basic {}",
                BASE64.encode(b"bob:tok-url-5e6f")
            )
        );
        assert_eq!(crate::sys::redact::scrub("tok-url-5e6f"), "***");
    }

    #[test]
    fn dockerfile_paths() {
        assert_eq!(
            relative_path("", "dockerfile_path", "Dockerfile").unwrap(),
            PathBuf::from("Dockerfile")
        );
        assert_eq!(
            relative_path("./docker/Dockerfile.prod", "dockerfile_path", "Dockerfile").unwrap(),
            PathBuf::from("./docker/Dockerfile.prod")
        );
        for bad in ["../Dockerfile", "a/../../b", "/etc/passwd", ".", "a/.."] {
            let e = relative_path(bad, "dockerfile_path", "Dockerfile")
                .unwrap_err()
                .to_string();
            assert!(e.contains("`dockerfile_path`"), "{bad}: {e}");
        }
    }

    #[test]
    fn dockerfile_symlink_escape_is_refused() {
        let d = crate::sys::fake::temp_dir("bld-symlink");
        std::fs::create_dir_all(d.join("sub")).unwrap();
        std::fs::write(d.join("Dockerfile"), "FROM x\n").unwrap();
        std::os::unix::fs::symlink("/etc/hostname", d.join("out")).unwrap();
        std::os::unix::fs::symlink("../Dockerfile", d.join("sub/in")).unwrap();
        assert!(dockerfile_in(&d, Path::new("Dockerfile")).is_ok());
        assert!(dockerfile_in(&d, Path::new("sub/in")).is_ok());
        assert!(dockerfile_in(&d, Path::new("out"))
            .unwrap_err()
            .to_string()
            .contains("outside"));
        assert!(dockerfile_in(&d, Path::new("sub"))
            .unwrap_err()
            .to_string()
            .contains("not a file"));
        assert!(dockerfile_in(&d, Path::new("nope"))
            .unwrap_err()
            .to_string()
            .contains("does not exist"));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn payload_validation_names_fields_and_registers_secrets() {
        let scope = Scope::new();
        let base = json!({
            "git_url": "https://git.example/a.git", "git_branch": "", "dockerfile_path": "",
            "deployment_id": "d", "project_id": "7A7A7A7A-0000-4000-8000-000000000007",
            "git_username": "agent", "git_token": "tok-unit-9f2c",
            "build_secrets": {"api_key": "sec-unit-77aa"}
        });
        let j = parse_job(&base, CP, &scope).unwrap();
        assert_eq!(j.project, "7a7a7a7a-0000-4000-8000-000000000007");
        assert_eq!(j.dockerfile, PathBuf::from("Dockerfile"));
        assert_eq!(
            j.git.auth_header.as_deref(),
            Some(
                format!(
                    "Authorization: Basic {}",
                    BASE64.encode(b"agent:tok-unit-9f2c")
                )
                .as_str()
            )
        );
        assert_eq!(
            crate::sys::redact::scrub("x tok-unit-9f2c sec-unit-77aa"),
            "x *** ***"
        );
        assert_eq!(
            crate::sys::redact::scrub(&BASE64.encode(b"agent:tok-unit-9f2c")),
            "***"
        );
        let with = |k: &str, v: serde_json::Value| {
            let mut p = base.clone();
            p[k] = v;
            parse_job(&p, CP, &scope).unwrap_err().to_string()
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
        assert_eq!(BASE64.encode(b""), "");
        assert_eq!(BASE64.encode(b"f"), "Zg==");
        assert_eq!(BASE64.encode(b"fo"), "Zm8=");
        assert_eq!(BASE64.encode(b"foo"), "Zm9v");
        assert_eq!(BASE64.encode(b"agent:s3cret"), "YWdlbnQ6czNjcmV0");
        assert_eq!(
            ssh_command(Path::new("/d/it's/key"), Path::new("/d/known_hosts")),
            "ssh -i '/d/it'\\''s/key' -o IdentitiesOnly=yes -o BatchMode=yes -o StrictHostKeyChecking=accept-new -o UserKnownHostsFile='/d/known_hosts'"
        );
        assert_eq!(registry_host("http://r.example:5000/"), "r.example:5000");

        assert!(is_uuid("7a7a7a7a-0000-4000-8000-000000000007"));
        assert!(!is_uuid("7a7a7a7a-0000-4000-8000-00000000000g"));
    }
}
