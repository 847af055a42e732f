//! The filesystem under DATA_DIR: how full it is (statvfs), and whether an error means "no
//! space" (a passing fault the agent waits out) rather than a bad configuration.

use std::fmt;
use std::io;
use std::path::Path;

/// Below this much free space DATA_DIR counts as full: a task could not even be recorded.
pub const FLOOR_BYTES: u64 = 1 << 20;
/// Below this many free inodes DATA_DIR counts as full.
pub const FLOOR_INODES: u64 = 64;

/// One statvfs reading of a filesystem.
#[derive(Clone, Copy, Debug)]
pub struct Usage {
    pub total_bytes: u64,
    pub used_bytes: u64,
    /// Free bytes for an unprivileged user (`df`'s Avail).
    pub avail_bytes: u64,
    /// Free inodes; None on filesystems that do not count them (btrfs).
    pub avail_inodes: Option<u64>,
}

impl Usage {
    /// Too little room left to record a task.
    pub fn full(&self) -> bool {
        self.avail_bytes < FLOOR_BYTES || self.avail_inodes.is_some_and(|n| n < FLOOR_INODES)
    }
}

impl fmt::Display for Usage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} KiB free", self.avail_bytes / 1024)?;
        match self.avail_inodes {
            Some(n) => write!(f, ", {n} inodes free"),
            None => Ok(()),
        }
    }
}

/// The filesystem holding `path`; None when statvfs fails.
pub fn usage(path: &Path) -> Option<Usage> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs fills the zeroed struct; the path is a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    let frsize = st.f_frsize as u64;
    let total_bytes = st.f_blocks as u64 * frsize;
    Some(Usage {
        total_bytes,
        used_bytes: total_bytes.saturating_sub(st.f_bfree as u64 * frsize),
        avail_bytes: st.f_bavail as u64 * frsize,
        avail_inodes: (st.f_files > 0).then_some(st.f_favail as u64),
    })
}

/// ENOSPC or EDQUOT: the disk (or the quota) is full.
pub fn no_space(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}
