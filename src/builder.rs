//! Builder role: clone, build and push an image.

use crate::executor::{self, Cmd};
use crate::tasks::Ctx;
use std::time::Duration;

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

pub fn detect_build_mode(docker: &str) -> BuildMode {
    let quick = |args: &[&str]| {
        executor::output(
            &Cmd::new(docker)
                .args(args.iter().copied())
                .timeout(Duration::from_secs(20), "docker probe timeout"),
        )
    };
    if quick(&["buildx", "version"]).is_ok() {
        return BuildMode::Buildx;
    }
    // Docker 23+ moved BuildKit into the buildx plugin; older CLIs carry it themselves.
    let major = quick(&["version", "--format", "{{.Client.Version}}"])
        .ok()
        .and_then(|o| {
            o.stdout
                .trim()
                .split('.')
                .next()
                .and_then(|m| m.parse::<u32>().ok())
        });
    match major {
        Some(m) if m < 23 => BuildMode::BuildKit,
        _ => BuildMode::Legacy,
    }
}

pub fn build(_ctx: &Ctx) -> Result<String, String> {
    Err("build is not implemented yet".into())
}
