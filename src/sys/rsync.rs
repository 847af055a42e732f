//! The rsync call of the dataset cache: a complete copy of one directory tree.

use crate::sys::executor::{Cmd, ExecError, Runner};
use std::path::Path;
use std::time::Duration;

/// `rsync -a --delete SRC/ DST/`: DST becomes an exact copy of SRC's contents.
pub fn mirror(
    runner: &dyn Runner,
    src: &Path,
    dst: &Path,
    (limit, setting): (Duration, &'static str),
    on_line: &mut dyn FnMut(&str),
) -> Result<(), ExecError> {
    let cmd = Cmd::new("rsync")
        .args(["-a", "--delete"])
        .arg(format!("{}/", src.display()))
        .arg(format!("{}/", dst.display()))
        .timeout(limit, setting);
    runner.run(&cmd, &mut |_, l| on_line(l)).map(drop)
}
