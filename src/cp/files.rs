//! Files of DATA_DIR/state (journal, outbox, log spills, late logs, marks): private to the
//! agent's user (directories 0700, files 0600, whatever the umask), written whole or not at
//! all, never through a symlink planted in the agent's way, and space reserved ahead for what
//! must be written when a task ends, so a full disk cannot keep it from being recorded.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Creates `dir` (and missing parents) 0700, and makes an existing one 0700. `dir` itself is
/// a real directory afterwards: a symlink found in its place (which would send the agent's
/// files, and its chmod, elsewhere) is removed, never followed. Parents are the operator's
/// (DATA_DIR may well be a symlink) and are followed.
pub fn private_dir(dir: &Path) -> io::Result<()> {
    if fs::symlink_metadata(dir).is_ok_and(|m| m.file_type().is_symlink()) {
        let target = fs::read_link(dir).unwrap_or_default();
        log::warn!(
            "{} was a symlink (to {}): replaced by a private directory",
            dir.display(),
            target.display()
        );
        fs::remove_file(dir)?;
    }
    DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    // Opened without following: a symlink raced in since is refused, not chmod'ed.
    let d = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_DIRECTORY)
        .open(dir)?;
    d.set_permissions(fs::Permissions::from_mode(0o700))
}

/// Creates a new file readable and writable by the agent's user only. Whatever was at
/// `path` (a stale temp file, a planted symlink) is removed first, and the file is created
/// exclusively (O_EXCL never follows a symlink), so nothing outside is ever truncated.
pub fn create_private(path: &Path) -> io::Result<File> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// Opens an existing state file for reading and writing, never through a symlink, and only
/// a regular file of one name: a hard link planted in its place may point at a file outside
/// DATA_DIR, which the caller would truncate.
pub fn open_existing(path: &Path) -> io::Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    let m = f.metadata()?;
    if !m.is_file() {
        return Err(io::Error::other("not a regular file"));
    }
    if m.nlink() != 1 {
        return Err(io::Error::other(format!("{} hard links", m.nlink())));
    }
    Ok(f)
}

/// Reads a state file; a symlink in its place is an error (ELOOP), not followed.
pub fn read(path: &Path) -> io::Result<Vec<u8>> {
    let mut f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    let mut data = Vec::new();
    f.read_to_end(&mut data)?;
    Ok(data)
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
    let opened = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(reserve);
    let mut f = match opened {
        Ok(f) if f.metadata()?.is_file() => f,
        // No reserve, or something else in its place (a symlink: ELOOP) that is not ours
        // to overwrite.
        Ok(_) => return write_atomic(path, data),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ELOOP)) => {
            return write_atomic(path, data)
        }
        Err(e) => return Err(e),
    };
    if f.metadata()?.len() < data.len() as u64 {
        return write_atomic(path, data);
    }
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

    /// Symlinks planted where the agent writes are replaced or refused, never followed: the
    /// files and directory they point to keep their content and mode.
    #[test]
    fn symlinks_in_the_state_are_never_followed() {
        use std::os::unix::fs::symlink;
        let d = temp_dir("files-symlinks");
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let elsewhere = d.join("elsewhere");
        fs::create_dir(&elsewhere).unwrap();
        fs::set_permissions(&elsewhere, fs::Permissions::from_mode(0o755)).unwrap();
        let victim = d.join("victim");
        fs::write(&victim, "precious").unwrap();
        let state = d.join("state");
        fs::create_dir(&state).unwrap();
        symlink(&elsewhere, state.join("outbox")).unwrap();
        private_dir(&state.join("outbox")).unwrap();
        assert!(!fs::symlink_metadata(state.join("outbox"))
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(mode(&elsewhere), 0o755);
        // A temp name, a reserve and a file read: none goes through the link.
        for name in ["x.tmp", "r", "y"] {
            symlink(&victim, state.join(name)).unwrap();
        }
        write_atomic(&state.join("x"), b"new").unwrap();
        assert!(read(&state.join("y")).is_err());
        write_reserved(&state.join("r"), &state.join("z"), b"z").unwrap();
        reserve(&state.join("r"), 100).unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        assert_eq!(fs::read(state.join("x")).unwrap(), b"new");
        assert_eq!(fs::metadata(state.join("r")).unwrap().len(), 100);
        let _ = fs::remove_dir_all(&d);
    }
}
