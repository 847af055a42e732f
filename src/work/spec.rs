//! The deploy spec: one parse of a `deploy` payload for single-container deploys and compose
//! projects (`mode:"compose"`), checked whole before anything runs; every error names its
//! field. What both shapes share (prefix, deployment, ports, memory, workspace, env) is read
//! once; the compose-only fields live in [`ComposeSpec`].

use crate::sys::docker::cli_reads;
use crate::sys::redact::Scope;
use crate::task::{valid_id, Invalid, Kind, Mode, Payload};
use crate::work::builder::{self, GitSource};
use crate::work::ctx::Ctx;
use crate::work::datasets::{self, Dataset};
use crate::work::error::TaskError;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use std::path::{Path, PathBuf};

/// The default compose file name, as the control plane assumes.
pub const DEFAULT_COMPOSE_FILE: &str = "docker-compose.yml";
/// Inline YAML larger than this is not a compose file the control plane wrote.
const MAX_INLINE: usize = 1 << 20;

/// A validated deploy payload.
pub struct DeploySpec<'a> {
    pub prefix: &'a str,
    /// The payload's, else the task's; only a compose deploy may have none ("").
    pub deployment_id: &'a str,
    /// The port the app listens on in its container: `container_port` (default 8080), or
    /// `expose_port` of a compose project.
    pub port: u16,
    pub fixed_port: Option<u16>,
    pub memory: &'a str,
    /// Workspace volume: host dir and container path.
    pub workspace: Option<(PathBuf, &'a str)>,
    pub env: Vec<(String, String)>,
    /// The image a single-container deploy runs ("" for compose: its files name them).
    pub image: &'a str,
    /// What a single-container deploy mounts (none for compose).
    pub datasets: Vec<Dataset>,
    /// A compose or image project (`mode:"compose"`).
    pub compose: Option<ComposeSpec<'a>>,
}

/// What only a compose deploy has.
pub struct ComposeSpec<'a> {
    pub source: Source<'a>,
    /// The compose file, relative to the repository (or the inline YAML's dir).
    pub file: PathBuf,
    pub service: &'a str,
    pub auths: Vec<Auth>,
}

/// Where the compose file comes from.
pub enum Source<'a> {
    Git(GitSource),
    Inline(&'a str),
}

/// A registry login for the project's pulls.
pub struct Auth {
    pub addr: String,
    pub basic: String,
}

impl<'a> DeploySpec<'a> {
    /// The task's payload as the task's kind reads it (compose for `mode:"compose"`).
    pub fn parse(ctx: &'a Ctx, p: &Payload<'a>) -> Result<DeploySpec<'a>, TaskError> {
        let env = parse_env(p, ctx.secrets)?;
        let prefix = domain_prefix(p)?;
        let (compose, image) = if ctx.task.kind() == Kind::Deploy(Mode::Compose) {
            (Some(ComposeSpec::parse(ctx, p)?), "")
        } else {
            (None, image_tag(p)?)
        };
        let deployment_id = match p.str("deployment_id")? {
            "" => ctx.task.deployment_id.as_str(),
            d => d,
        };
        // A compose project may come without one (its labels then carry "").
        let optional = compose.is_some() && deployment_id.is_empty();
        if !optional && !valid_id(deployment_id) {
            return Err(invalid(format!(
                "payload field `deployment_id`: {deployment_id:?} is not a valid id"
            )));
        }
        let port = match compose {
            Some(_) => port_field(p, "expose_port")?
                .ok_or_else(|| invalid("payload field `expose_port` is required".into()))?,
            None => port_field(p, "container_port")?.unwrap_or(8080),
        };
        let fixed_port = port_field(p, "fixed_host_port")?;
        let memory = p.str("memory_limit")?.trim();
        if !memory.is_empty() && !docker_size(memory) {
            return Err(invalid(format!(
                "payload field `memory_limit`: {memory:?} is not a size like 512m or 4g"
            )));
        }
        let workspace = parse_workspace(p, &ctx.cp.volume_nfs_base_path)?;
        let datasets = match compose {
            Some(_) => Vec::new(),
            None => datasets::parse(p, ctx.cp, &ctx.cfg.data_dir)?,
        };
        Ok(DeploySpec {
            prefix,
            deployment_id,
            port,
            fixed_port,
            memory,
            workspace,
            env,
            image,
            datasets,
            compose,
        })
    }
}

impl<'a> ComposeSpec<'a> {
    fn parse(ctx: &'a Ctx, p: &Payload<'a>) -> Result<ComposeSpec<'a>, TaskError> {
        let auths = parse_auths(p, ctx.secrets)?;
        let inline = p.str("inline_compose_yaml")?;
        let source = if !inline.trim().is_empty() {
            if inline.len() > MAX_INLINE || inline.contains('\0') {
                return Err(invalid(
                    "payload field `inline_compose_yaml`: larger than 1 MiB or contains NUL".into(),
                ));
            }
            Source::Inline(inline)
        } else if p.str("git_url")?.trim().is_empty() {
            return Err(invalid(
                "payload field `git_url` or `inline_compose_yaml` is required".into(),
            ));
        } else {
            Source::Git(builder::git_source(
                p,
                &ctx.cfg.control_plane_url,
                ctx.secrets,
            )?)
        };
        let file = compose_file(p)?;
        let service = p.required("expose_service")?;
        if !service_name(service) {
            return Err(invalid(format!(
                "payload field `expose_service`: {service:?} is not a service name (A-Z a-z 0-9 . _ -)"
            )));
        }
        Ok(ComposeSpec {
            source,
            file,
            service,
            auths,
        })
    }
}

fn invalid(msg: String) -> TaskError {
    TaskError::Invalid(msg)
}

/// `compose_file_path`: relative, inside the repository; `docker-compose.yml` by default.
pub fn compose_file(p: &Payload) -> Result<PathBuf, Invalid> {
    builder::relative_path(
        p.str("compose_file_path")?,
        "compose_file_path",
        DEFAULT_COMPOSE_FILE,
    )
}

/// `domain_prefix` becomes a container name and a Traefik host: it must be a DNS label.
pub fn domain_prefix<'a>(p: &Payload<'a>) -> Result<&'a str, Invalid> {
    let v = p.required("domain_prefix")?;
    let ok = v.len() <= 63
        && v.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !v.starts_with('-')
        && !v.ends_with('-');
    if !ok {
        return Err(Invalid(format!(
            "payload field `domain_prefix`: {v:?} is not a DNS label (a-z, 0-9, '-', at most 63)"
        )));
    }
    Ok(v)
}

fn image_tag<'a>(p: &Payload<'a>) -> Result<&'a str, Invalid> {
    let image = p.required("image_tag")?;
    if !image_ref(image) {
        return Err(Invalid(format!(
            "payload field `image_tag`: {image:?} is not an image reference"
        )));
    }
    Ok(image)
}

fn port_field(p: &Payload, key: &str) -> Result<Option<u16>, Invalid> {
    match p.uint(key)? {
        None | Some(0) => Ok(None),
        Some(n) => u16::try_from(n).map(Some).map_err(|_| {
            Invalid(format!(
                "payload field `{key}`: {n} is not a port (1-65535)"
            ))
        }),
    }
}

/// `env_vars`, registered for redaction before anything can log them.
fn parse_env(p: &Payload, secrets: &Scope) -> Result<Vec<(String, String)>, Invalid> {
    let env = p.string_map("env_vars")?;
    for (_, v) in &env {
        secrets.add_weak(v);
    }
    for (k, v) in &env {
        let why = if !env_name(k) {
            return Err(Invalid(format!(
                "payload field `env_vars`: {k:?} is not a variable name ([A-Za-z_][A-Za-z0-9_]*)"
            )));
        } else if v.contains('\0') {
            "the value contains a NUL byte"
        } else if cli_reads(k) && v.contains(['\n', '\r']) {
            "a value with a line break cannot be passed for a name the docker CLI reads itself"
        } else {
            continue;
        };
        return Err(Invalid(format!("payload field `env_vars.{k}`: {why}")));
    }
    Ok(env)
}

/// The workspace volume: VOLUME_NFS_BASE_PATH/<project_id> mounted at `volume_mount_path`.
fn parse_workspace<'a>(p: &Payload<'a>, base: &str) -> Result<Option<(PathBuf, &'a str)>, Invalid> {
    let mount_path = p.str("volume_mount_path")?;
    if !mount_path.is_empty() && !container_path(mount_path) {
        return Err(Invalid(format!(
            "payload field `volume_mount_path`: {mount_path:?} must be an absolute path without '..', ':' or ','"
        )));
    }
    let base = base.trim();
    if mount_path.is_empty() || base.is_empty() {
        return Ok(None);
    }
    let project = p.required("project_id")?;
    if !valid_id(project) {
        return Err(Invalid(format!(
            "payload field `project_id`: {project:?} is not a valid id"
        )));
    }
    if base.contains([':', ',']) {
        return Err(Invalid(format!(
            "volume NFS base path {base:?} contains ':' or ',', which docker -v cannot take"
        )));
    }
    Ok(Some((Path::new(base).join(project), mount_path)))
}

/// `registry_auths: [{addr, username, password}]`, registered for redaction first.
fn parse_auths(p: &Payload, scope: &Scope) -> Result<Vec<Auth>, Invalid> {
    let items = p.objects("registry_auths")?;
    for a in &items {
        scope.add(a.str("password")?);
    }
    let mut auths = Vec::new();
    for a in &items {
        let addr = a.str("addr")?.trim();
        if addr.is_empty() {
            // The control plane drops these too: a login for no registry.
            continue;
        }
        if addr.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(Invalid(format!(
                "payload field `{}`: {addr:?} is not a registry address",
                a.field("addr")
            )));
        }
        let user = a.required("username")?;
        let password = a.required("password")?;
        if user.contains(':') {
            return Err(Invalid(format!(
                "payload field `{}` must not contain ':'",
                a.field("username")
            )));
        }
        let basic = BASE64.encode(format!("{user}:{password}"));
        scope.add(&basic);
        auths.push(Auth {
            addr: addr.to_string(),
            basic,
        });
    }
    Ok(auths)
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

/// Compose service names: what compose itself accepts, and nothing YAML would reinterpret.
fn service_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }
}
