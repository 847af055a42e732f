//! The workspace volume (protocol §4.5): `VOLUME_NFS_BASE_PATH/<project_id>`, mounted
//! read-write. A directory this deploy creates is given to the image's user, so an app that
//! runs as non-root can write its own workspace. An existing directory is never changed.
//!
//! Unlike today's agent (W-13), the user is read after the image is pulled, so it is known.
//! A fresh directory is empty, so owning the directory is the whole `lchown -R`; it is
//! opened with O_NOFOLLOW, so a symlink swapped in at that path is refused, not followed.
//! Failing to tell the user or to change the owner is logged and the deploy goes on.

use crate::sys::docker::DockerError;
use crate::work::ctx::Ctx;
use crate::work::error::TaskError;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Creates the workspace when it does not exist (a fresh one owned by the image's user) and
/// returns its canonical path for `-v`.
pub fn prepare(ctx: &Ctx, dir: &Path, image: &str) -> Result<PathBuf, TaskError> {
    let fresh = matches!(std::fs::symlink_metadata(dir), Err(e) if e.kind() == std::io::ErrorKind::NotFound);
    // Asked before the directory exists: a failed lookup must not leave it behind as root's
    // (the next deploy would see it as not fresh).
    let owner = if fresh { image_owner(ctx, image) } else { None };
    let what = format!("cannot create workspace {}", dir.display());
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent).map_err(TaskError::io(&what))?;
    }
    match std::fs::create_dir(dir) {
        Ok(()) => {
            if let Some((uid, gid)) = owner {
                give(ctx, dir, uid, gid);
            }
        }
        // Created meanwhile by someone else: not ours to change.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(TaskError::io(what)(e)),
    }
    let what = format!("workspace {}", dir.display());
    std::fs::canonicalize(dir).map_err(TaskError::io(what))
}

/// How an image names its user (`Config.User`).
#[derive(Debug, PartialEq, Eq)]
pub enum User {
    /// Empty or uid 0: nothing to change.
    Root,
    /// `uid` or `uid:gid`, numeric (the gid defaults to the uid).
    Ids(u32, u32),
    /// A name somewhere (`app`, `app:staff`, `1000:staff`): the image's own files say.
    Named,
}

pub fn parse_user(user: &str) -> User {
    let user = user.trim();
    if user.is_empty() {
        return User::Root;
    }
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let uid: Option<u32> = u.parse().ok();
    let gid: Option<u32> = match g {
        Some(g) => g.parse().ok(),
        None => uid,
    };
    match (uid, gid) {
        (Some(0), _) => User::Root,
        (Some(uid), Some(gid)) => User::Ids(uid, gid),
        _ => User::Named,
    }
}

/// The (uid, gid) a fresh workspace gets; None for root, or when it cannot be told.
fn image_owner(ctx: &Ctx, image: &str) -> Option<(u32, u32)> {
    let docker = ctx.docker();
    let skip = |e: DockerError| {
        log::warn!("skip workspace chown: cannot tell the user of {image}: {e}");
        ctx.say(&format!(
            "Not changing the workspace owner: cannot tell the user of {image}: {e}"
        ));
    };
    let user = docker.image_user(image).map_err(skip).ok()?;
    let ids = match parse_user(&user) {
        User::Root => return None,
        User::Ids(uid, gid) => (uid, gid),
        User::Named => docker.image_ids(image).map_err(skip).ok()?,
    };
    (ids.0 != 0).then_some(ids)
}

/// Gives the directory we just created to uid:gid, refusing to follow a symlink.
fn give(ctx: &Ctx, dir: &Path, uid: u32, gid: u32) {
    match chown_dir_nofollow(dir, uid, gid) {
        Ok(()) => ctx.say(&format!(
            "Workspace {} is owned by the image's user {uid}:{gid}",
            dir.display()
        )),
        Err(e) => {
            log::warn!("skip workspace chown of {}: {e}", dir.display());
            ctx.say(&format!(
                "Could not give workspace {} to {uid}:{gid}: {e}",
                dir.display()
            ));
        }
    }
}

/// fchown on the directory opened with O_DIRECTORY | O_NOFOLLOW: a symlink at `dir` fails
/// (ENOTDIR or ELOOP) instead of handing its target to the app.
pub fn chown_dir_nofollow(dir: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(dir)?;
    std::os::unix::fs::fchown(&f, Some(uid), Some(gid))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::fake::Reply;
    use crate::work::ctx::testing::Harness;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn image_users_are_read_like_docker_reads_them() {
        assert_eq!(parse_user(""), User::Root);
        assert_eq!(parse_user("0"), User::Root);
        assert_eq!(parse_user("0:1000"), User::Root);
        assert_eq!(parse_user("1000"), User::Ids(1000, 1000));
        assert_eq!(parse_user("1000:1001"), User::Ids(1000, 1001));
        assert_eq!(parse_user("app"), User::Named);
        assert_eq!(parse_user("app:staff"), User::Named);
        assert_eq!(parse_user("1000:staff"), User::Named);
        assert_eq!(parse_user("-1"), User::Named);
    }

    fn is_root() -> bool {
        std::fs::metadata("/proc/self")
            .map(|m| m.uid() == 0)
            .unwrap_or(false)
    }

    #[test]
    fn a_fresh_workspace_goes_to_the_image_user_an_existing_one_is_left_alone() {
        let h = Harness::new("ws-owner", &[("NODE_ROLE", "deploy")]);
        h.fake.on(
            "docker image inspect --format {{.Config.User}}",
            Reply::Ok("app\n".into()),
        );
        h.fake
            .on("docker run --rm", Reply::Ok("1001\n1002\n".into()));
        let ws = h.dir.join("volumes/proj-1");
        let got = h.with("deploy", serde_json::json!({}), |ctx| {
            prepare(ctx, &ws, "r/app:1")
        });
        assert_eq!(got.unwrap(), std::fs::canonicalize(&ws).unwrap());
        assert_eq!(
            h.fake.ran("docker run"),
            ["docker run --rm --network none --entrypoint  r/app:1 sh -c id -u; id -g"]
        );
        if is_root() {
            let m = std::fs::metadata(&ws).unwrap();
            assert_eq!((m.uid(), m.gid()), (1001, 1002));
            assert!(
                h.said().contains("owned by the image's user 1001:1002"),
                "{}",
                h.said()
            );
        }
        // Existing: not even asked.
        let before = h.fake.calls().len();
        h.with("deploy", serde_json::json!({}), |ctx| {
            prepare(ctx, &ws, "r/app:1")
        })
        .unwrap();
        assert_eq!(h.fake.calls().len(), before);
    }

    #[test]
    fn a_failed_lookup_is_logged_and_the_deploy_goes_on() {
        let h = Harness::new("ws-fail", &[("NODE_ROLE", "deploy")]);
        h.fake.on("docker image inspect", Reply::Ok("app".into()));
        h.fake.on(
            "docker run --rm",
            Reply::Fail(127, "exec: \"sh\": not found".into()),
        );
        let ws = h.dir.join("volumes/proj-2");
        let r = h.with("deploy", serde_json::json!({}), |ctx| {
            prepare(ctx, &ws, "distroless:1")
        });
        assert!(r.is_ok() && ws.is_dir());
        assert!(
            h.said().contains("cannot tell the user of distroless:1"),
            "{}",
            h.said()
        );
    }

    #[test]
    fn a_symlink_is_never_followed() {
        let h = Harness::new("ws-link", &[("NODE_ROLE", "deploy")]);
        let target = h.dir.join("target");
        std::fs::create_dir_all(&target).unwrap();
        let link = h.dir.join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = chown_dir_nofollow(&link, 4242, 4242).unwrap_err();
        // Linux says ENOTDIR (O_DIRECTORY) or ELOOP (O_NOFOLLOW): refused either way.
        let refused = [Some(libc::ELOOP), Some(libc::ENOTDIR)];
        assert!(refused.contains(&e.raw_os_error()), "{e}");
        assert_ne!(std::fs::metadata(&target).unwrap().uid(), 4242);
    }
}
