//! Files of DATA_DIR/state (journal, outbox): private to the agent's user (directories 0700,
//! files 0600, whatever the umask), written whole or not at all, and space reserved ahead
//! for what must be written when a task ends, so a full disk cannot keep it from being
//! recorded.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Creates `dir` (and missing parents) 0700, and makes an existing one 0700.
pub fn private_dir(dir: &Path) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
}

/// Creates (or truncates) a file readable by the agent's user only.
pub fn create_private(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

/// Writes a file so that a crash leaves either the old or the new content, never half; a
/// failed write leaves nothing behind.
pub fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let written = (|| {
        let mut f = create_private(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        sync_dir(path)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}

pub fn sync_dir(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(dir) => File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

/// Removes what interrupted writes left in `dir` (`*.tmp`).
pub fn remove_temps(dir: &Path) {
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.path().extension().is_some_and(|x| x == "tmp") {
            let _ = fs::remove_file(e.path());
        }
    }
}

/// Creates `path` with `size` bytes written (not a sparse file: its blocks and its inode are
/// taken now). Nothing is left behind when that fails.
pub fn reserve(path: &Path, size: usize) -> io::Result<()> {
    let made = (|| {
        let mut f = create_private(path)?;
        f.write_all(&vec![0; size])?;
        f.sync_all()?;
        sync_dir(path)
    })();
    if made.is_err() {
        let _ = fs::remove_file(path);
    }
    made
}

/// Writes `data` to `path` through the space `reserve` holds (overwritten in place, then
/// renamed: no new block or inode is needed, so this works on a full disk). Without a
/// reserve big enough, as [`write_atomic`].
pub fn write_reserved(reserve: &Path, path: &Path, data: &[u8]) -> io::Result<()> {
    let f = match OpenOptions::new().write(true).open(reserve) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return write_atomic(path, data),
        Err(e) => return Err(e),
    };
    if f.metadata()?.len() < data.len() as u64 {
        return write_atomic(path, data);
    }
    let mut f = f;
    f.write_all(data)?;
    f.set_len(data.len() as u64)?;
    f.sync_all()?;
    fs::rename(reserve, path)?;
    sync_dir(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::fake::temp_dir;

    #[test]
    fn files_and_dirs_are_private_whatever_the_umask() {
        let d = temp_dir("files-private");
        let dir = d.join("a/b");
        fs::create_dir_all(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        private_dir(&dir).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        write_atomic(&dir.join("x"), b"secret").unwrap();
        assert_eq!(mode(&dir.join("x")), 0o600);
        reserve(&dir.join("r"), 100).unwrap();
        assert_eq!(mode(&dir.join("r")), 0o600);
        write_reserved(&dir.join("r"), &dir.join("y"), b"short").unwrap();
        assert_eq!(fs::read(dir.join("y")).unwrap(), b"short");
        assert!(!dir.join("r").exists());
        // No reserve (or one too small): an ordinary atomic write.
        write_reserved(&dir.join("r"), &dir.join("z"), b"z").unwrap();
        assert_eq!(fs::read(dir.join("z")).unwrap(), b"z");
        let _ = fs::remove_dir_all(&d);
    }
}
