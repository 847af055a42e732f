//! Cleanups that did not finish. A `cleanup` task marks its domain prefix in
//! `DATA_DIR/state/cleanups/` before it removes anything and clears the mark when it is done;
//! a deploy of the prefix clears it too. A mark that stays (the agent was killed or stopped
//! mid-task, whose report then says `failed: agent restarted during task`, and the server
//! never sends it again) tells the reaper the app's containers belong to nobody.

use crate::cp::files;
use std::path::{Path, PathBuf};

fn dir(data_dir: &Path) -> PathBuf {
    data_dir.join("state/cleanups")
}

/// Marks `prefix` (a validated DNS label) as being cleaned up.
pub fn begin(data_dir: &Path, prefix: &str) -> std::io::Result<()> {
    files::private_dir(&dir(data_dir))?;
    files::create_private(&dir(data_dir).join(prefix)).map(drop)
}

/// The cleanup of `prefix` finished, or a deploy brought the app back.
pub fn end(data_dir: &Path, prefix: &str) -> std::io::Result<()> {
    match std::fs::remove_file(dir(data_dir).join(prefix)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The prefixes whose cleanup was started and never finished.
pub fn unfinished(data_dir: &Path) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(dir(data_dir)) else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str().map(String::from))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_come_and_go() {
        let d = crate::sys::fake::temp_dir("cleanups").join("data");
        assert!(unfinished(&d).is_empty());
        begin(&d, "app").unwrap();
        begin(&d, "api").unwrap();
        let mut u = unfinished(&d);
        u.sort();
        assert_eq!(u, ["api", "app"]);
        end(&d, "app").unwrap();
        end(&d, "app").unwrap();
        assert_eq!(unfinished(&d), ["api"]);
        let _ = std::fs::remove_dir_all(&d);
    }
}
