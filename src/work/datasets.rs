//! Dataset cache for the deploy role: rsync copies under DATA_DIR/objects, per-deployment
//! symlinks under DATA_DIR/mounts, least-recently-used eviction beyond MAX_STORAGE.
//!
//! A version dir `objects/<id>/v<version>` only ever appears by an atomic rename of a
//! finished sync, and counts as cached only once its marker `v<version>.complete` exists
//! (written and fsync'd last, once the copy's data is on disk; eviction removes it first,
//! then renames the dir out of the cache before deleting it). A cached version is used
//! without touching its source. Its mtime is the LRU clock. A new version is synced with a
//! cached one as rsync's link target: unchanged files are hard links, shared by both, and
//! the cache's size counts them once.

use crate::config::Config;
use crate::sys::{rsync, tree};
use crate::task::valid_id;
use crate::task::{AgentConfig, Invalid, Payload};
use crate::work::ctx::{CacheBook, Ctx, Shared};
use crate::work::error::TaskError;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// A large dataset over NFS can take hours; a hung mount must not hold a deploy for ever.
const SYNC_TIMEOUT: Duration = Duration::from_secs(6 * 3600);

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Copied into the local cache, mounted read-only.
    Dependency,
    /// The share itself, mounted read-write.
    ReadWrite,
}

#[derive(Clone, Debug)]
pub struct Dataset {
    pub id: String,
    pub name: String,
    pub version: u64,
    pub mode: Mode,
    /// The source directory on the share (absolute, exists).
    pub source: PathBuf,
}

pub fn objects_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("objects")
}

pub fn version_dir(data_dir: &Path, id: &str, version: u64) -> PathBuf {
    objects_dir(data_dir).join(id).join(format!("v{version}"))
}

/// `objects/<id>/v<n>.complete`, beside the version dir so the app never sees it.
fn marker(version: &Path) -> PathBuf {
    let name = version.file_name().unwrap_or_default().to_string_lossy();
    version.with_file_name(format!("{name}.complete"))
}

/// A complete copy: the dir and its marker exist.
fn is_cached(version: &Path) -> bool {
    version.is_dir() && marker(version).is_file()
}

/// Writes the marker durably: the copy's data first (rsync does not fsync), then the
/// marker, then its directory entry.
fn mark_complete(version: &Path) -> std::io::Result<()> {
    rsync::sync_to_disk(version)?;
    let m = marker(version);
    let f = std::fs::File::create(&m)?;
    f.sync_all()?;
    sync_parent(&m)
}

fn sync_parent(p: &Path) -> std::io::Result<()> {
    match p.parent() {
        Some(dir) => std::fs::File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

/// Takes a version out of the cache: marker first, then a rename to a temp name (a crash
/// before the delete leaves a temp, never a partial version). Returns the temp to delete.
fn take_out(version: &Path) -> std::io::Result<PathBuf> {
    match std::fs::remove_file(marker(version)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => sync_parent(version)?,
    }
    let name = version.file_name().unwrap_or_default().to_string_lossy();
    let doomed = version.with_file_name(format!(".{name}.evict-{}", std::process::id()));
    std::fs::rename(version, &doomed)?;
    Ok(doomed)
}

fn discard(version: &Path) -> std::io::Result<()> {
    std::fs::remove_dir_all(take_out(version)?)
}

pub fn mounts_dir(data_dir: &Path, deployment_id: &str) -> PathBuf {
    data_dir.join("mounts").join(deployment_id)
}

impl CacheBook {
    /// Bytes used by cached dataset versions as last measured (reported as
    /// `used_storage_bytes`; 0 until the first measure). Never walks the cache: a large one
    /// would hold up the agent loop's heartbeat. Measured off the loop at start, by every
    /// eviction check (after each sync) and grown by each sync.
    pub fn bytes(&self) -> u64 {
        self.total
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .unwrap_or(0)
    }

    /// Walks the cache (at start, on a thread of its own) unless a newer figure exists.
    pub fn measure(&self, data_dir: &Path) {
        let bytes = tree::usage(&objects_dir(data_dir)).total;
        self.total
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(bytes);
    }

    fn set_total(&self, total: u64) {
        *self.total.lock().unwrap_or_else(|e| e.into_inner()) = Some(total);
    }

    fn grew(&self, bytes: u64) {
        if let Some(t) = self
            .total
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            *t += bytes;
        }
    }

    fn pin(&self, p: &Path) {
        self.pinned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(p.to_path_buf());
    }

    fn unpin(&self, pins: &[PathBuf]) {
        let mut pinned = self.pinned.lock().unwrap_or_else(|e| e.into_inner());
        for p in pins {
            if let Some(i) = pinned.iter().position(|x| x == p) {
                pinned.swap_remove(i);
            }
        }
    }
}

/// Removes a retired deployment's mount dir (symlinks only; the cache stays).
pub fn remove_mounts(data_dir: &Path, deployment_id: &str) -> Result<(), TaskError> {
    if !valid_id(deployment_id) {
        return Err(TaskError::Invalid(format!(
            "deployment id {deployment_id:?} is not a valid id"
        )));
    }
    if !mounts_is_ours(data_dir) {
        return Err(TaskError::Invalid(format!(
            "{} is not a directory of the agent's (a symlink?): nothing under it is removed",
            data_dir.join("mounts").display()
        )));
    }
    let dir = mounts_dir(data_dir, deployment_id);
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(TaskError::io(format!("cannot remove {}", dir.display()))(e)),
    }
}

/// Whether `DATA_DIR/mounts` is a real directory (or absent), not a symlink to elsewhere:
/// only then does a path under it stay inside DATA_DIR.
fn mounts_is_ours(data_dir: &Path) -> bool {
    match std::fs::symlink_metadata(data_dir.join("mounts")) {
        Ok(m) => m.file_type().is_dir(),
        Err(e) => e.kind() == std::io::ErrorKind::NotFound,
    }
}

/// Removes the mount dirs that no container of ours uses and no deploy in flight is setting
/// up: those of a deploy that died with the agent when the start-up reconcile could not
/// finish (the engine failing then), or that were never recorded. Pins are read before the
/// containers are listed, and a deploy unpins only once its container exists, so a dir
/// being set up is always seen one way or the other. Logs and returns the deployment ids it
/// removed (maybe another app's: the agent's log, not a task's).
pub fn sweep_mounts(cfg: &Config, shared: &Shared) -> Vec<String> {
    let Ok(data_dir) = std::fs::canonicalize(&cfg.data_dir) else {
        return Vec::new();
    };
    if !mounts_is_ours(&data_dir) {
        return Vec::new();
    }
    let rd = std::fs::read_dir(data_dir.join("mounts"))
        .into_iter()
        .flatten();
    let ids: Vec<String> = rd
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|id| valid_id(id))
        .collect();
    let unpinned: Vec<String> = {
        let pinned = shared
            .cache
            .pinned
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let is_free = |id: &String| !pinned.contains(&mounts_dir(&data_dir, id));
        ids.into_iter().filter(is_free).collect()
    };
    if unpinned.is_empty() {
        return Vec::new();
    }
    let Ok(rows) = shared.docker(cfg).managed() else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for id in unpinned {
        if rows.iter().any(|r| r.deployment_id == id) {
            continue;
        }
        match remove_mounts(&data_dir, &id) {
            Ok(()) => {
                log::info!("removed DATA_DIR/mounts/{id} (no container uses it)");
                removed.push(id);
            }
            Err(e) => log::warn!("{e}"),
        }
    }
    removed
}

/// Parses and checks `datasets` without touching anything but `stat`.
pub fn parse(p: &Payload, cp: &AgentConfig, data_dir: &Path) -> Result<Vec<Dataset>, Invalid> {
    let mut out: Vec<Dataset> = Vec::new();
    for d in p.objects("datasets")? {
        let ds = parse_one(&d, cp, data_dir)?;
        if out.iter().any(|o| o.name == ds.name) {
            let field = d.field("name");
            return Err(Invalid(format!(
                "payload field `{field}`: {:?} appears twice",
                ds.name
            )));
        }
        out.push(ds);
    }
    Ok(out)
}

fn parse_one(d: &Payload, cp: &AgentConfig, data_dir: &Path) -> Result<Dataset, Invalid> {
    let bad = |key: &str, why: String| Invalid(format!("payload field `{}`: {why}", d.field(key)));
    let name = d.required("name")?;
    // The name becomes a path under mounts/ and a container path /data/<name>; ':' and
    // ',' would split docker's -v syntax.
    if name.contains(['/', '\\', ':', ',', '\0']) || name.contains("..") || name == "." {
        let why = format!("{name:?} is not a valid dataset name (no '/', '..', ':' or ',')");
        return Err(bad("name", why));
    }
    let mode = match d.str("mount_mode")? {
        "dependency" => Mode::Dependency,
        "readwrite" => Mode::ReadWrite,
        // The Go agent bind-mounts anything else read-write (W-17); refuse instead.
        m => {
            let why = format!("{m:?} is not a mount mode (dependency or readwrite)");
            return Err(bad("mount_mode", why));
        }
    };
    let (id, version) = if mode == Mode::Dependency {
        let id = d.required("id")?;
        if !safe_component(id) {
            return Err(bad(
                "id",
                format!("{id:?} cannot be used as a directory name"),
            ));
        }
        let v = d.uint("version")?.ok_or_else(|| {
            Invalid(format!(
                "payload field `{}` is required",
                d.field("version")
            ))
        })?;
        (id.to_string(), v)
    } else {
        (d.str("id")?.to_string(), 0)
    };
    let cached = mode == Mode::Dependency && is_cached(&version_dir(data_dir, &id, version));
    let source = source_dir(d, name, cp, cached)?;
    Ok(Dataset {
        id,
        name: name.to_string(),
        version,
        mode,
        source,
    })
}

/// `nfs_path`, absolute or under the dataset base path; it must exist unless the version
/// is cached (the share may be unreachable: the cached copy is all a deploy needs).
fn source_dir(d: &Payload, name: &str, cp: &AgentConfig, cached: bool) -> Result<PathBuf, Invalid> {
    let nfs = d.required("nfs_path")?;
    if Path::new(nfs).components().any(|c| c.as_os_str() == "..") {
        let field = d.field("nfs_path");
        return Err(Invalid(format!(
            "payload field `{field}`: {nfs:?} contains '..'"
        )));
    }
    let base = cp.dataset_nfs_base_path.trim();
    let source = if Path::new(nfs).is_absolute() {
        PathBuf::from(nfs)
    } else if base.is_empty() {
        return Err(Invalid("dataset NFS base path is not configured".into()));
    } else {
        Path::new(base).join(nfs)
    };
    let source = match std::fs::canonicalize(&source) {
        Ok(s) if s.is_dir() => s,
        _ if cached => return Ok(source),
        _ => {
            return Err(Invalid(format!(
                "dataset `{name}`: source directory {} does not exist",
                source.display()
            )))
        }
    };
    if source.to_string_lossy().contains([':', ',']) {
        return Err(Invalid(format!(
            "dataset `{name}`: source path {} contains ':' or ',', which docker -v cannot take",
            source.display()
        )));
    }
    Ok(source)
}

/// A path component we create ourselves: no separators, no dot names, no leading '-'.
pub fn safe_component(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && !s.starts_with(['.', '-'])
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// The `-v` values for a deploy. Holds pins on its cached versions until dropped, which the
/// deployer does once the container runs (docker then reports the mounts) or is gone.
pub struct Mounts<'a> {
    pub volumes: Vec<String>,
    pins: Vec<PathBuf>,
    book: &'a CacheBook,
}

impl Drop for Mounts<'_> {
    fn drop(&mut self) {
        self.book.unpin(&self.pins);
    }
}

/// Syncs dependency datasets into the cache, links them under mounts/<deployment_id> and
/// returns the `-v` values (dependency mounts first, then read-write ones, as Go orders them).
pub fn setup<'a>(
    ctx: &'a Ctx,
    deployment_id: &str,
    list: &[Dataset],
) -> Result<Mounts<'a>, TaskError> {
    let mut m = Mounts {
        volumes: Vec::new(),
        pins: Vec::new(),
        book: &ctx.shared.cache,
    };
    if list.is_empty() {
        return Ok(m);
    }
    let data_dir = mountable_data_dir(ctx.cfg)?;
    let mdir = mounts_dir(&data_dir, deployment_id);
    // Pinned before it exists: `sweep_mounts` leaves it alone until the container runs.
    m.book.pin(&mdir);
    m.pins.push(mdir.clone());
    let mut synced = false;
    for d in list.iter().filter(|d| d.mode == Mode::Dependency) {
        let target = version_dir(&data_dir, &d.id, d.version);
        m.book.pin(&target);
        m.pins.push(target.clone());
        synced |= ensure(ctx, d, &target)?;
        let what = format!("cannot create {}", mdir.display());
        std::fs::create_dir_all(&mdir).map_err(TaskError::io(what))?;
        let link = mdir.join(&d.name);
        let what = format!("cannot link {}", link.display());
        relink(&target, &link).map_err(TaskError::io(what))?;
        m.volumes
            .push(format!("{}:/data/{}:ro", link.display(), d.name));
    }
    for d in list.iter().filter(|d| d.mode == Mode::ReadWrite) {
        ctx.say(&format!(
            "Dataset {}: mounting {} read-write",
            d.name,
            d.source.display()
        ));
        m.volumes
            .push(format!("{}:/data/{}:rw", d.source.display(), d.name));
    }
    if synced {
        if let Err(e) = evict(ctx.cfg, ctx.shared, &|l| ctx.say(l)) {
            ctx.say(&format!("Dataset cache eviction skipped: {e}"));
        }
    }
    Ok(m)
}

/// DATA_DIR as docker needs it: absolute, and without ':' or ',' (they split its -v syntax).
fn mountable_data_dir(cfg: &Config) -> Result<PathBuf, TaskError> {
    let what = format!("DATA_DIR {}", cfg.data_dir.display());
    let data_dir = std::fs::canonicalize(&cfg.data_dir).map_err(TaskError::io(what))?;
    if data_dir.to_string_lossy().contains([':', ',']) {
        return Err(TaskError::Invalid(format!(
            "DATA_DIR {} contains ':' or ',', which docker -v cannot take",
            data_dir.display()
        )));
    }
    Ok(data_dir)
}

/// Makes `target` a complete copy of the dataset; true when it had to sync.
fn ensure(ctx: &Ctx, d: &Dataset, target: &Path) -> Result<bool, TaskError> {
    // One lock per dataset: concurrent deploys wait for one sync instead of racing.
    ctx.exclusive(&format!("dataset:{}", d.id), || {
        if is_cached(target) {
            touch(target);
            ctx.say(&format!(
                "Dataset {}: version {} is cached, nothing to copy",
                d.name, d.version
            ));
            return Ok(false);
        }
        let dir = target.parent().unwrap_or(target);
        let what = format!("cannot create {}", dir.display());
        std::fs::create_dir_all(dir).map_err(TaskError::io(what))?;
        remove_stale_temps(dir);
        if target.exists() {
            // Not complete: an interrupted eviction, or a copy by an older agent.
            let what = format!("cannot remove the incomplete copy {}", target.display());
            discard(target).map_err(TaskError::io(what))?;
        }
        let tmp = dir.join(format!(".v{}.tmp-{}", d.version, std::process::id()));
        let what = format!("cannot create {}", tmp.display());
        std::fs::create_dir(&tmp).map_err(TaskError::io(what))?;
        // Pinned so that eviction keeps it while rsync links to it.
        let prev = link_target(dir, d.version);
        let book = &ctx.shared.cache;
        let linked = match &prev {
            Some((v, p)) => {
                book.pin(p);
                format!(" (files unchanged since version {v} are linked, not copied)")
            }
            None => String::new(),
        };
        ctx.say(&format!(
            "Dataset {}: copying version {} from {}{linked}",
            d.name,
            d.version,
            d.source.display()
        ));
        let synced = sync_into(
            ctx,
            d,
            &tmp,
            target,
            prev.as_ref().map(|(_, p)| p.as_path()),
        );
        if let Some((_, p)) = &prev {
            book.unpin(std::slice::from_ref(p));
        }
        if let Err(e) = synced {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
        touch(target);
        // The cache grew by the copies; linked files were there already.
        let u = tree::usage(target);
        book.grew(u.exclusive);
        ctx.say(&format!(
            "Dataset {}: cached {} bytes, {} of them copied",
            d.name, u.total, u.exclusive
        ));
        Ok(true)
    })
}

/// Temp dirs start with '.', so they are never taken for a version. One whose process is
/// gone is from an interrupted sync or eviction; our syncs' are covered by the dataset lock,
/// our evictions' are being deleted by them.
fn remove_stale_temps(dir: &Path) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    let me = std::process::id().to_string();
    for e in rd.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        // `.v1.tmp-<pid>` (a sync) or `.v1.evict-<pid>` (an eviction).
        let alive = match n.rsplit_once('-') {
            Some((kind, pid)) if pid == me => kind.ends_with(".evict"),
            Some((_, pid)) => Path::new("/proc").join(pid).exists(),
            None => false,
        };
        if n.starts_with('.') && !alive {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// The newest other cached version of the dataset in `dir`: (version, its dir).
fn link_target(dir: &Path, version: u64) -> Option<(u64, PathBuf)> {
    let rd = std::fs::read_dir(dir).into_iter().flatten().flatten();
    rd.filter_map(|e| {
        let n = e
            .file_name()
            .to_str()?
            .strip_prefix('v')?
            .parse::<u64>()
            .ok()?;
        (n != version && is_cached(&e.path())).then(|| (n, e.path()))
    })
    .max()
}

/// rsync into `tmp` (linking what `prev` holds unchanged), then the atomic rename that
/// makes the version exist.
fn sync_into(
    ctx: &Ctx,
    d: &Dataset,
    tmp: &Path,
    target: &Path,
    prev: Option<&Path>,
) -> Result<(), TaskError> {
    let limit = (SYNC_TIMEOUT, "dataset sync limit 6h");
    rsync::mirror(&*ctx.shared.runner, &d.source, tmp, prev, limit, &mut |l| {
        (ctx.out)(l)
    })
    .map_err(|e| TaskError::from(e).context(format!("dataset `{}`", d.name)))?;
    let what = format!("dataset `{}`: cannot move the copy into place", d.name);
    match std::fs::rename(tmp, target) {
        // Another agent process sharing DATA_DIR finished the same version first.
        Err(_) if is_cached(target) => {
            let _ = std::fs::remove_dir_all(tmp);
            Ok(())
        }
        r => r
            .and_then(|()| mark_complete(target))
            .map_err(TaskError::io(what)),
    }
}

/// Points `link` at `target`, replacing an old link atomically.
fn relink(target: &Path, link: &Path) -> std::io::Result<()> {
    let name = link.file_name().unwrap_or_default().to_string_lossy();
    let tmp = link.with_file_name(format!(".{name}.link-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp)?;
    std::fs::rename(&tmp, link)
}

/// Marks a version as just used (its mtime is the LRU clock).
fn touch(dir: &Path) {
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.set_modified(SystemTime::now());
    }
}

/// Deletes least-recently-used versions until the cache fits MAX_STORAGE, skipping every
/// version a managed container (running or stopped, as a rollback may restart it) mounts or
/// an in-flight deploy has pinned. Under the book's lock a version is only taken out of the
/// cache (marker, rename); the deletes come after, so no deploy waits for them to pin.
pub fn evict(cfg: &Config, shared: &Shared, say: &dyn Fn(&str)) -> Result<(), TaskError> {
    let Ok(data_dir) = std::fs::canonicalize(&cfg.data_dir) else {
        return Ok(());
    };
    let book = &shared.cache;
    let (mut total, versions) = survey(&objects_dir(&data_dir));
    book.set_total(total);
    if total <= cfg.max_storage {
        return Ok(());
    }
    let in_use = shared.docker(cfg).managed_mounts()?;
    let mut doomed = Vec::new();
    let pinned = book.pinned.lock().unwrap_or_else(|e| e.into_inner());
    for (v, bytes) in versions {
        if total <= cfg.max_storage {
            break;
        }
        if pinned.contains(&v) || in_use.contains(&v) {
            continue;
        }
        match take_out(&v) {
            Ok(d) => {
                doomed.push((v, d, bytes));
                total = total.saturating_sub(bytes);
            }
            Err(e) => say(&format!("Dataset cache: cannot evict {}: {e}", v.display())),
        }
    }
    drop(pinned);
    book.set_total(total);
    for (v, d, bytes) in doomed {
        // Out of the cache already; its files go now.
        say(&format!(
            "Dataset cache: evicted {} ({bytes} bytes)",
            v.display()
        ));
        match std::fs::remove_dir_all(&d) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => say(&format!(
                "Dataset cache: cannot delete {}: {e}",
                d.display()
            )),
            _ => {}
        }
        if let Some(parent) = v.parent() {
            let _ = std::fs::remove_dir(parent); // only succeeds when empty
        }
    }
    if total > cfg.max_storage {
        say(&format!(
            "Dataset cache: {total} bytes is over MAX_STORAGE ({}), but the rest is in use",
            cfg.max_storage
        ));
    }
    Ok(())
}

/// The cache's size and every cached version dir with its own, least recently used first,
/// in one walk.
fn survey(root: &Path) -> (u64, Vec<(PathBuf, u64)>) {
    let mut entries: Vec<(PathBuf, Option<SystemTime>)> = Vec::new();
    for ds in std::fs::read_dir(root).into_iter().flatten().flatten() {
        for v in std::fs::read_dir(ds.path()).into_iter().flatten().flatten() {
            let is_dir = v.file_type().is_ok_and(|t| t.is_dir());
            let version = is_dir && v.file_name().to_string_lossy().starts_with('v');
            let t = v.metadata().and_then(|m| m.modified()).ok();
            entries.push((v.path(), t.filter(|_| version)));
        }
    }
    // Each inode once; a version's bytes are what deleting it frees (files another version
    // links stay). Two versions sharing files are each counted without them: evicting both
    // frees more than counted, which at worst evicts one version more than needed.
    let paths: Vec<PathBuf> = entries.iter().map(|(p, _)| p.clone()).collect();
    let (total, freed) = tree::usages(&paths);
    let mut versions: Vec<(SystemTime, PathBuf, u64)> = entries
        .into_iter()
        .zip(freed)
        .filter_map(|((p, t), bytes)| Some((t?, p, bytes)))
        .collect();
    versions.sort();
    let versions = versions.into_iter().map(|(_, p, b)| (p, b)).collect();
    (total, versions)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::fake::Reply;
    use crate::work::ctx::testing::Harness;
    use serde_json::json;
    use std::sync::Arc;

    /// A deploy node with a dataset share holding one file.
    fn node(name: &str, env: &[(&str, &str)]) -> (Harness, Vec<Dataset>) {
        let mut env = env.to_vec();
        env.push(("NODE_ROLE", "deploy"));
        let h = Harness::new(name, &env);
        let share = h.dir.join("share/corpus");
        std::fs::create_dir_all(&share).unwrap();
        std::fs::write(share.join("a.txt"), "0123456789").unwrap();
        let v = json!({"datasets": [{"id": "d1", "name": "n", "version": 1,
                       "mount_mode": "dependency", "nfs_path": share}]});
        let list = parse(&Payload::of(&v).unwrap(), &h.cp, &h.cfg.data_dir).unwrap();
        // rsync SRC/ DST/: copy the one file, as rsync would.
        h.fake.on(
            "rsync",
            Reply::With(Arc::new(|cmd| {
                let arg = |i: usize| cmd.args[cmd.args.len() - i].to_string_lossy().into_owned();
                let (src, dst) = (PathBuf::from(arg(2)), PathBuf::from(arg(1)));
                std::fs::copy(src.join("a.txt"), dst.join("a.txt")).unwrap();
                Ok(String::new())
            })),
        );
        (h, list)
    }

    fn entries(p: &Path) -> Vec<String> {
        let rd = std::fs::read_dir(p).into_iter().flatten().flatten();
        let mut v: Vec<String> = rd
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn the_sweep_removes_only_mount_dirs_no_container_uses_and_no_deploy_sets_up() {
        let (h, list) = node("ds-sweep", &[]);
        let rows = "a1\tmuvee-app\trunning\tapp\tdep-used\t8080\tnode-1\n";
        h.fake.on(
            "docker ps -a --filter label=muvee.managed=true",
            Reply::Ok(rows.into()),
        );
        let mounts = h.cfg.data_dir.join("mounts");
        for d in ["dep-used", "dep-orphan", "dep-gone"] {
            std::fs::create_dir_all(mounts.join(d)).unwrap();
        }
        // A deploy in flight: its links exist, its container does not yet.
        let swept = h
            .with("deploy", json!({}), |ctx| {
                let m = setup(ctx, "dep-new", &list)?;
                let swept = sweep_mounts(ctx.cfg, ctx.shared);
                drop(m);
                Ok::<_, TaskError>(swept)
            })
            .unwrap();
        let mut swept = swept;
        swept.sort();
        assert_eq!(swept, ["dep-gone", "dep-orphan"]);
        assert_eq!(entries(&mounts), ["dep-new", "dep-used"]);
        // Once the deploy is over and no container runs it, it goes too.
        assert_eq!(sweep_mounts(&h.cfg, &h.shared), ["dep-new"]);
        assert_eq!(entries(&mounts), ["dep-used"]);
        // A DATA_DIR/mounts that is a symlink leads out of DATA_DIR: nothing is removed.
        let outside = h.dir.join("outside");
        std::fs::create_dir_all(outside.join("dep-else")).unwrap();
        std::fs::remove_dir_all(&mounts).unwrap();
        std::os::unix::fs::symlink(&outside, &mounts).unwrap();
        assert!(sweep_mounts(&h.cfg, &h.shared).is_empty());
        assert!(remove_mounts(&h.cfg.data_dir, "dep-else").is_err());
        assert_eq!(entries(&outside), ["dep-else"]);
    }

    #[test]
    fn a_failed_sync_leaves_neither_a_version_nor_a_temp_dir() {
        let (h, list) = node("ds-fail", &[]);
        let err = "rsync error: some files/attrs were not transferred (code 23)";
        h.fake.once("rsync", Reply::Fail(23, err.into()));
        let r = h.with("deploy", json!({}), |ctx| {
            setup(ctx, "dep-1", &list).map(|m| m.volumes.clone())
        });
        let e = r.unwrap_err().to_string();
        assert_eq!(e, format!("dataset `n`: rsync exited 23: {err}"));
        assert!(entries(&h.cfg.data_dir.join("objects/d1")).is_empty());
        // The next deploy syncs again and mounts the complete copy read-only.
        let vols = h
            .with("deploy", json!({}), |ctx| {
                setup(ctx, "dep-1", &list).map(|m| m.volumes.clone())
            })
            .unwrap();
        let data = std::fs::canonicalize(&h.cfg.data_dir).unwrap();
        assert_eq!(
            vols,
            [format!("{}/mounts/dep-1/n:/data/n:ro", data.display())]
        );
        assert_eq!(
            entries(&h.cfg.data_dir.join("objects/d1")),
            ["v1", "v1.complete"]
        );
        assert_eq!(h.fake.ran("rsync -a --delete").len(), 2);
        // Cached: no third copy.
        h.with("deploy", json!({}), |ctx| {
            setup(ctx, "dep-2", &list).map(drop)
        })
        .unwrap();
        assert_eq!(h.fake.ran("rsync").len(), 2);
        assert!(h
            .said()
            .contains("Dataset n: version 1 is cached, nothing to copy"));
    }

    #[test]
    fn only_a_complete_version_counts_as_cached_and_it_needs_no_source() {
        let (h, list) = node("ds-marker", &[]);
        let sync = |dep: &str| h.with("deploy", json!({}), |ctx| setup(ctx, dep, &list).map(drop));
        sync("dep-1").unwrap();
        // As if an eviction was killed after taking the marker: half the files are gone.
        let v = h.cfg.data_dir.join("objects/d1/v1");
        std::fs::remove_file(marker(&v)).unwrap();
        std::fs::remove_file(v.join("a.txt")).unwrap();
        sync("dep-2").unwrap();
        assert_eq!(
            h.fake.ran("rsync").len(),
            2,
            "an incomplete copy was taken for cached"
        );
        assert!(v.join("a.txt").is_file() && is_cached(&v));
        // The share goes away: the cached version still deploys, a version never copied not.
        std::fs::remove_dir_all(h.dir.join("share")).unwrap();
        let mut p = json!({"datasets": [{"id": "d1", "name": "n", "version": 1,
                           "mount_mode": "dependency", "nfs_path": h.dir.join("share/corpus")}]});
        let parsed = parse(&Payload::of(&p).unwrap(), &h.cp, &h.cfg.data_dir).unwrap();
        h.with("deploy", json!({}), |ctx| {
            setup(ctx, "dep-3", &parsed).map(drop)
        })
        .unwrap();
        assert_eq!(h.fake.ran("rsync").len(), 2);
        p["datasets"][0]["version"] = json!(2);
        let e = parse(&Payload::of(&p).unwrap(), &h.cp, &h.cfg.data_dir).unwrap_err();
        assert!(
            e.0.contains("source directory") && e.0.contains("does not exist"),
            "{e}"
        );
    }

    /// objects/<id>/v1 holding 10 bytes, last used `age` seconds ago.
    fn version(h: &Harness, id: &str, age: u64) -> PathBuf {
        let v = objects_dir(&std::fs::canonicalize(&h.cfg.data_dir).unwrap())
            .join(id)
            .join("v1");
        std::fs::create_dir_all(&v).unwrap();
        std::fs::write(v.join("f"), "0123456789").unwrap();
        mark_complete(&v).unwrap();
        let t = SystemTime::now() - Duration::from_secs(age);
        std::fs::File::open(&v).unwrap().set_modified(t).unwrap();
        v
    }

    #[test]
    fn eviction_skips_mounted_and_pinned_versions_and_removes_the_oldest_other() {
        let (h, _) = node("ds-evict", &[("MAX_STORAGE", "25")]);
        let (mounted, old, new) = (
            version(&h, "c", 300),
            version(&h, "a", 200),
            version(&h, "b", 100),
        );
        h.fake.on(
            "docker ps -aq --filter label=muvee.managed=true",
            Reply::Ok("cid1".into()),
        );
        let mounts = format!(r#"[{{"Source":"{}"}}]"#, mounted.display());
        h.fake.on(
            "docker inspect --format {{json .Mounts}} cid1",
            Reply::Ok(mounts),
        );
        let said = std::sync::Mutex::new(Vec::new());
        evict(&h.cfg, &h.shared, &|l| {
            said.lock().unwrap().push(l.to_string())
        })
        .unwrap();
        assert!(mounted.exists() && !old.exists() && new.exists());
        assert_eq!(h.shared.cache.bytes(), 20);
        // Pinned by an in-flight deploy: kept even when that leaves the cache over budget.
        let (h2, _) = node("ds-evict-pin", &[("MAX_STORAGE", "15")]);
        let (m2, p2) = (version(&h2, "c", 300), version(&h2, "a", 200));
        h2.shared.cache.pin(&p2);
        let mounts = format!(r#"[{{"Source":"{}"}}]"#, m2.display());
        h2.fake.on("docker ps -aq", Reply::Ok("cid1".into()));
        h2.fake.on(
            "docker inspect --format {{json .Mounts}} cid1",
            Reply::Ok(mounts),
        );
        let said = std::sync::Mutex::new(Vec::new());
        evict(&h2.cfg, &h2.shared, &|l| {
            said.lock().unwrap().push(l.to_string())
        })
        .unwrap();
        assert!(m2.exists() && p2.exists());
        assert!(
            said.lock().unwrap()[0].contains("is over MAX_STORAGE (15), but the rest is in use")
        );
    }

    #[test]
    fn eviction_deletes_with_no_lock_held_once_the_version_is_out_of_the_cache() {
        let (h, _) = node("ds-evict-unlocked", &[("MAX_STORAGE", "15")]);
        let (old, new) = (version(&h, "a", 200), version(&h, "b", 100));
        h.fake.on("docker ps -aq", Reply::Ok(String::new()));
        let seen = std::sync::Mutex::new(Vec::new());
        evict(&h.cfg, &h.shared, &|l| {
            if l.contains("evicted") {
                // A deploy could pin now, and the doomed copy is still there to delete.
                let free = h.shared.cache.pinned.try_lock().is_ok();
                let doomed = old.with_file_name(format!(".v1.evict-{}", std::process::id()));
                seen.lock()
                    .unwrap()
                    .push((free, old.exists(), doomed.exists()));
            }
        })
        .unwrap();
        assert_eq!(*seen.lock().unwrap(), [(true, false, true)]);
        assert!(!old.parent().unwrap().exists() && new.exists());
        assert_eq!(h.shared.cache.bytes(), 10);
    }

    #[test]
    fn eviction_deletes_nothing_when_docker_cannot_say_what_is_mounted() {
        let (h, _) = node("ds-evict-blind", &[("MAX_STORAGE", "5")]);
        let v = version(&h, "a", 100);
        h.fake.on(
            "docker ps -aq",
            Reply::Fail(1, "Cannot connect to the Docker daemon".into()),
        );
        let e = evict(&h.cfg, &h.shared, &|_| {}).unwrap_err().to_string();
        assert!(e.contains("Cannot connect to the Docker daemon"), "{e}");
        assert!(v.exists());
    }

    fn parse_v(v: serde_json::Value, base: &str) -> Result<Vec<Dataset>, String> {
        let cp = AgentConfig {
            dataset_nfs_base_path: base.into(),
            ..AgentConfig::default()
        };
        parse(&Payload::of(&v).unwrap(), &cp, Path::new("/nonexistent")).map_err(|e| e.0)
    }

    #[test]
    fn rejects_bad_names_ids_and_paths_naming_the_field() {
        let base = std::env::temp_dir();
        let base = base.to_str().unwrap();
        let ds = |name: &str, id: &str, nfs: &str| json!({"datasets":[{"id":id,"name":name,"nfs_path":nfs,"version":1,"mount_mode":"dependency"}]});
        for bad in ["", "a/b", "..", "x..y", "a:b", "."] {
            let e = parse_v(ds(bad, "d1", "."), base).unwrap_err().to_string();
            assert!(e.contains("datasets[0].name"), "{bad:?}: {e}");
        }
        for bad in ["../x", "a/b", ".hidden", "-rf", ""] {
            let e = parse_v(ds("n", bad, "."), base).unwrap_err().to_string();
            assert!(e.contains("datasets[0].id"), "{bad:?}: {e}");
        }
        let e = parse_v(ds("n", "d1", "../etc"), base)
            .unwrap_err()
            .to_string();
        assert!(e.contains("datasets[0].nfs_path"), "{e}");
        let e = parse_v(ds("n", "d1", "rel"), "").unwrap_err().to_string();
        assert_eq!(e, "dataset NFS base path is not configured");
        let e = parse_v(ds("n", "d1", "no-such-dir-4242"), base)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no-such-dir-4242") && e.contains("does not exist"),
            "{e}"
        );
        let v = json!({"datasets":[{"id":"d","name":"n","nfs_path":".","version":1,"mount_mode":"rw"}]});
        assert!(parse_v(v, base)
            .unwrap_err()
            .to_string()
            .contains("mount_mode"));
        let v =
            json!({"datasets":[{"id":"d","name":"n","nfs_path":".","mount_mode":"dependency"}]});
        assert!(parse_v(v, base)
            .unwrap_err()
            .to_string()
            .contains("datasets[0].version"));
        let v = json!({"datasets":[{"id":"d","name":"n","nfs_path":".","version":2.0,"mount_mode":"dependency"}]});
        assert_eq!(parse_v(v, base).unwrap()[0].version, 2);
        assert!(parse_v(json!({"datasets": null}), "").unwrap().is_empty());
    }
}
