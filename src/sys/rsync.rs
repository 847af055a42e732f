//! The rsync call of the dataset cache: a complete copy of one directory tree, and making
//! it durable (rsync writes without fsync).

use crate::sys::executor::{Cmd, ExecError, Runner};
use std::path::Path;
use std::time::Duration;

/// `rsync -a --delete [--checksum --link-dest=PREV] SRC/ DST/`: DST becomes an exact copy of
/// SRC's contents; a file PREV holds with the same content (compared by checksum: a rewrite
/// keeping size and mtime must not be linked), mode and mtime becomes a hard link to PREV's.
pub fn mirror(
    runner: &dyn Runner,
    src: &Path,
    dst: &Path,
    link_dest: Option<&Path>,
    (limit, setting): (Duration, &'static str),
    on_line: &mut dyn FnMut(&str),
) -> Result<(), ExecError> {
    let mut cmd = Cmd::new("rsync").args(["-a", "--delete"]);
    if let Some(prev) = link_dest {
        cmd = cmd
            .arg("--checksum")
            .arg(format!("--link-dest={}", prev.display()));
    }
    let cmd = cmd
        .arg(format!("{}/", src.display()))
        .arg(format!("{}/", dst.display()))
        .timeout(limit, setting);
    runner.run(&cmd, &mut |_, l| on_line(l)).map(drop)
}

/// Flushes the filesystem holding `dir` to disk (syncfs(2)): every file and directory entry
/// a copy wrote, in one call however many files it has. A copy is only marked complete
/// after this, so a power loss can never leave a marked copy with missing data.
pub fn sync_to_disk(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::io::AsRawFd;
    let f = std::fs::File::open(dir)?;
    // SAFETY: syncfs on a descriptor we own.
    match unsafe { libc::syncfs(f.as_raw_fd()) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}
