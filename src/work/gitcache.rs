//! The builder's git cache: one repository per clone URL and credential under DATA_DIR/git,
//! kept between builds (builds with other credentials never share its objects). A build fetches with its own credentials every time (a build whose credentials
//! cannot fetch fails, whatever the cache holds), receives only the objects the cache lacks
//! (its commits are the negotiation's haves; `--depth=1` keeps a first fetch as small as
//! today's shallow clone), checks the commit out in the cache's work tree, where git rewrites
//! only the files that changed, and takes a copy made of hard links into its private dir,
//! whose only ref is the branch built.
//!
//! ```text
//! git/<key>.lock    flock: one build or eviction per repository at a time, across processes
//! git/<key>/source  the URL and credential fingerprint it caches, written last: an entry
//!                   without it is incomplete
//! git/<key>/repo/   the repository and its work tree; no credentials in its config
//! git/.<key>.*      a rebuild or a deletion in progress
//! ```
//! A fetch or checkout that fails in an existing entry (a corrupt or interrupted cache, or a
//! remote that refuses) is retried in a new one, which replaces the old only if it works.
//! `source`'s mtime is the LRU clock; GIT_CACHE_MAX bounds the whole.

use crate::sys::executor::{ExecError, Limits};
use crate::sys::git::Git;
use crate::sys::sync::{random_u64, FileLock};
use crate::sys::tree;
use crate::work::ctx::Ctx;
use crate::work::error::TaskError;
use std::fs::DirBuilder;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

/// Checks `branch` of `url` (the default one when empty) out into `dest` (which must not
/// exist) through the entry of `url` and `cred` (see [`fingerprint`]). A new entry comes back
/// as [`Fresh`], to settle once the build is over.
pub fn checkout(
    ctx: &Ctx,
    git: Git,
    (url, cred): (&str, &str),
    branch: &str,
    dest: &Path,
    limits: Limits,
) -> Result<Option<Fresh>, TaskError> {
    let started = Instant::now();
    let git = cache_settings(git);
    let branch = match branch {
        "" => match git.default_branch(url, limits)? {
            Some(b) => b,
            // A detached remote HEAD has no branch to keep: the uncached clone.
            None => {
                let out = &mut |l: &str| (ctx.out)(l);
                git.clone_shallow(url, "", dest, limits, out)?;
                return Ok(None);
            }
        },
        b => b.to_string(),
    };
    let root = cache_root(&ctx.cfg.data_dir)?;
    let source = format!("{url}\n{cred}\n");
    let key = key(&source);
    let lock_path = root.join(format!("{key}.lock"));
    let lock = FileLock::at(&lock_path, true).map_err(TaskError::io(lock_path.display()))?;
    let entry = Entry {
        git: &git,
        url,
        source: &source,
        branch: &branch,
        limits,
    };
    let (fetched, fresh) = entry.update(ctx, &root, &key)?;
    let repo = root.join(&key).join("repo");
    let head = git.head(&repo, limits)?;
    copy_branch(&repo, dest, &branch, &head).map_err(TaskError::io(format!(
        "cannot copy {} to {}",
        repo.display(),
        dest.display()
    )))?;
    touch(&root.join(&key).join("source"));
    drop(lock);
    ctx.say(&format!(
        "Git cache: fetched {fetched} bytes; clone step {:.2}s",
        started.elapsed().as_secs_f64()
    ));
    if let Err(e) = evict(&root, ctx.cfg.git_cache_max, &key) {
        ctx.say(&format!("Git cache eviction skipped: {e}"));
    }
    Ok(fresh.then(|| Fresh {
        repo,
        source,
        at: Instant::now(),
    }))
}

/// The cache's own settings travel with each call: git writes nothing in place that a
/// build's hard links share (no reflogs), and never leaves a gc running behind us.
fn cache_settings(git: Git) -> Git {
    git.config("core.logAllRefUpdates", "false")
        // Hard links to its files (the builds' copies) change their ctime.
        .config("core.trustctime", "false")
        .config("gc.autoDetach", "false")
        .config("maintenance.autoDetach", "false")
}

/// A work tree just written in full. Its files are as new as the index, so git takes them
/// as racily clean and reads every one of them again at the next checkout; once a second
/// has passed, one refresh records them as unchanged and the next build's clone step
/// touches only what changed.
pub struct Fresh {
    repo: PathBuf,
    source: String,
    at: Instant,
}

impl Fresh {
    /// Best effort, after the build: a build shorter than a second, or a repository another
    /// build holds, leaves it to the next checkout.
    pub fn settle(self, ctx: &Ctx) {
        if self.at.elapsed() < std::time::Duration::from_secs(1) {
            return;
        }
        let Some(dir) = self.repo.parent() else {
            return;
        };
        let lock_path = dir.with_extension("lock");
        let Ok(Some(_lock)) = FileLock::at(&lock_path, false) else {
            return;
        };
        if std::fs::read_to_string(dir.join("source")).is_ok_and(|s| s == self.source) {
            let git = cache_settings(Git::new(&*ctx.shared.runner));
            let limits = Limits {
                deadline: None,
                idle: Some(ctx.cfg.build_idle_timeout),
            };
            if let Err(e) = git.refresh_index(&self.repo, limits) {
                log::debug!("git cache: {e}");
            }
        }
    }
}

/// DATA_DIR/git, private (0700): work trees may hold anything a repository holds.
fn cache_root(data_dir: &Path) -> Result<PathBuf, TaskError> {
    let root = data_dir.join("git");
    let made = DirBuilder::new().recursive(true).mode(0o700).create(&root);
    made.map_err(TaskError::io(format!("git cache {}", root.display())))?;
    Ok(root)
}

/// Which credentials a build fetches with, as an entry's second name: `anonymous`, or the
/// SHA-256 of what it sends (an `Authorization` header, an SSH key), never the secret itself.
pub fn fingerprint(secret: Option<&str>) -> String {
    match secret {
        None => "anonymous".into(),
        Some(s) => format!("cred-{}", sha256_hex(&format!("muvee-git-cache\0{s}"))),
    }
}

fn sha256_hex(s: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, s.as_bytes());
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// The entry name of a `source`: 64 bits of its SHA-256 in hex. A collision only costs a
/// rebuild: the entry's `source` file must match.
fn key(source: &str) -> String {
    sha256_hex(source)[..16].to_string()
}

/// Makes `dest` a hard-link copy of the entry `repo` with `branch` (at `head`) as its only
/// ref: no other branch, remote-tracking ref, reflog or FETCH_HEAD reaches the build.
fn copy_branch(repo: &Path, dest: &Path, branch: &str, head: &str) -> std::io::Result<()> {
    let git = Path::new(".git");
    let dropped = ["FETCH_HEAD", "ORIG_HEAD", "packed-refs", "logs"].map(|n| git.join(n));
    let refs = git.join("refs");
    tree::link_copy(repo, dest, &|rel| {
        dropped.iter().any(|d| d == rel) || (rel.starts_with(&refs) && rel != refs)
    })?;
    let ref_path = dest.join(".git/refs/heads").join(branch);
    if let Some(dir) = ref_path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::create_dir_all(dest.join(".git/refs/tags"))?;
    std::fs::write(ref_path, format!("{head}\n"))
}

/// One repository's fetch and checkout, done in the cache entry or a new one.
struct Entry<'a> {
    git: &'a Git<'a>,
    url: &'a str,
    source: &'a str,
    branch: &'a str,
    limits: Limits,
}

impl Entry<'_> {
    /// Brings `root/key/repo` to the branch's newest commit, under the key's lock. Returns
    /// the object bytes fetched, and whether the entry is new.
    fn update(&self, ctx: &Ctx, root: &Path, key: &str) -> Result<(u64, bool), TaskError> {
        let dir = root.join(key);
        let cached = std::fs::read_to_string(dir.join("source")).is_ok_and(|s| s == self.source);
        if cached {
            match self.fetch_checkout(ctx, &dir.join("repo")) {
                Ok(n) => return Ok((n, false)),
                Err(e) if !worth_a_rebuild(&e) => return Err(e.into()),
                Err(e) => ctx.say(&format!("Git cache: {e}; fetching into a new cache entry")),
            }
        }
        let fresh = root.join(format!(".{key}.new-{:016x}", random_u64()));
        let built = self.build(ctx, &fresh).and_then(|n| {
            let old = root.join(format!(".{key}.old-{:016x}", random_u64()));
            let io = TaskError::io(format!("cannot replace {}", dir.display()));
            if let Err(e) = std::fs::rename(&dir, &old) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    return Err(io(e));
                }
            }
            let _ = std::fs::remove_dir_all(&old);
            std::fs::rename(&fresh, &dir).map_err(io)?;
            Ok((n, true))
        });
        if built.is_err() {
            let _ = std::fs::remove_dir_all(&fresh);
        }
        built
    }

    /// A new entry at `dir`: init, fetch, checkout, then `source`.
    fn build(&self, ctx: &Ctx, dir: &Path) -> Result<u64, TaskError> {
        let repo = dir.join("repo");
        let what = format!("cannot create {}", dir.display());
        DirBuilder::new()
            .mode(0o700)
            .create(dir)
            .map_err(TaskError::io(what))?;
        self.git.init(&repo, self.url, self.limits)?;
        let n = self.fetch_checkout(ctx, &repo)?;
        let src = dir.join("source");
        std::fs::write(&src, self.source).map_err(TaskError::io(src.display()))?;
        Ok(n)
    }

    fn fetch_checkout(&self, ctx: &Ctx, repo: &Path) -> Result<u64, ExecError> {
        let objects = repo.join(".git/objects");
        let before = tree::usage(&objects).total;
        let out = &mut |l: &str| (ctx.out)(l);
        let (git, limits) = (self.git, self.limits);
        git.fetch_branch(repo, self.url, self.branch, limits, out)?;
        git.checkout_fetched(repo, self.branch, limits)?;
        Ok(tree::usage(&objects).total.saturating_sub(before))
    }
}

/// git refused (exit status): the cache may be what is broken. A timeout, cancel or a git
/// that cannot start would fail the same way in a new entry.
fn worth_a_rebuild(e: &ExecError) -> bool {
    matches!(e, ExecError::Exit { .. } | ExecError::Signal { .. })
}

/// Marks an entry as just used.
fn touch(p: &Path) {
    if let Ok(f) = std::fs::File::options().append(true).open(p) {
        let _ = f.set_modified(SystemTime::now());
    }
}

/// Deletes least recently used entries (never `keep`, nor one a build holds) until the cache
/// fits `max` bytes; removes what interrupted rebuilds and deletions left.
pub fn evict(root: &Path, max: u64, keep: &str) -> std::io::Result<()> {
    let mut entries: Vec<(SystemTime, String)> = Vec::new();
    for e in std::fs::read_dir(root)?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let key = name.trim_start_matches('.').split('.').next().unwrap_or("");
        if key == keep {
            continue;
        }
        if name.starts_with('.') {
            remove_locked(root, key, Some(&name));
        } else if name.ends_with(".lock") && !root.join(key).exists() {
            remove_locked(root, key, None);
        } else if e.file_type().is_ok_and(|t| t.is_dir()) {
            let t = std::fs::metadata(e.path().join("source")).and_then(|m| m.modified());
            entries.push((t.unwrap_or(SystemTime::UNIX_EPOCH), name));
        }
    }
    entries.sort();
    let mut total = tree::usage(root).total;
    for (_, key) in entries {
        if total <= max {
            break;
        }
        let freed = tree::usage(&root.join(&key)).exclusive;
        if remove_locked(root, &key, Some(&key)) {
            log::info!("git cache: evicted {key} ({freed} bytes)");
            total = total.saturating_sub(freed);
        }
    }
    Ok(())
}

/// If nobody holds `key`'s lock: removes `name` under `root` (an entry is renamed out of the
/// way first, so an interrupted delete never looks like one), then the lock file when the
/// key has no entry left. True when `name` went.
fn remove_locked(root: &Path, key: &str, name: Option<&str>) -> bool {
    let lock_path = root.join(format!("{key}.lock"));
    let Ok(Some(lock)) = FileLock::at(&lock_path, false) else {
        return false;
    };
    let removed = name.is_some_and(|n| {
        let path = root.join(n);
        if n.starts_with('.') {
            return std::fs::remove_dir_all(&path).is_ok();
        }
        let doomed = root.join(format!(".{key}.old-{:016x}", random_u64()));
        std::fs::rename(&path, &doomed).is_ok() && std::fs::remove_dir_all(&doomed).is_ok()
    });
    if !root.join(key).exists() {
        lock.delete(&lock_path);
    }
    removed
}
