//! Dataset cache for the deploy role: rsync copies under DATA_DIR/objects, per-deployment
//! symlinks under DATA_DIR/mounts.

use std::path::{Path, PathBuf};

pub fn objects_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("objects")
}

pub fn mounts_dir(data_dir: &Path, deployment_id: &str) -> PathBuf {
    data_dir.join("mounts").join(deployment_id)
}

/// Bytes used by cached dataset versions (reported as `used_storage_bytes`).
pub fn cache_bytes(data_dir: &Path) -> u64 {
    dir_bytes(&objects_dir(data_dir))
}

pub fn dir_bytes(p: &Path) -> u64 {
    let Ok(md) = std::fs::symlink_metadata(p) else {
        return 0;
    };
    if !md.is_dir() {
        return md.len();
    }
    std::fs::read_dir(p)
        .map(|rd| rd.flatten().map(|e| dir_bytes(&e.path())).sum())
        .unwrap_or(0)
}

/// Removes a retired deployment's mount dir (symlinks only; the cache stays).
pub fn remove_mounts(data_dir: &Path, deployment_id: &str) -> Result<(), String> {
    if !crate::state::valid_task_id(deployment_id) {
        return Err(format!("deployment id {deployment_id:?} is not a valid id"));
    }
    let dir = mounts_dir(data_dir, deployment_id);
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("cannot remove {}: {e}", dir.display())),
    }
}
