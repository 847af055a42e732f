//! The task journal under DATA_DIR/state/tasks: a task ID is never run twice, and a task
//! interrupted by a crash is reported. A journal write that fails (a full disk) is undone,
//! never left as an empty entry that would make a task look taken; a finish that cannot be
//! written is kept in memory and retried until it lands.

use crate::task::Task;
use serde::{Deserialize, Serialize};
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// Writes a file so that a crash leaves either the old or the new content, never half; a
/// failed write leaves nothing behind.
pub fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let written = (|| {
        let mut f = fs::File::create(&tmp)?;
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

fn sync_dir(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(dir) => fs::File::open(dir)?.sync_all(),
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

#[derive(Debug, Serialize, Deserialize)]
pub struct JournalEntry {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub deployment_id: String,
    pub state: String,
    pub at: u64,
}

pub struct Journal {
    dir: PathBuf,
    /// Tasks finished in memory whose entry could not be written yet.
    unsaved: Mutex<Vec<String>>,
}

impl Journal {
    pub fn open(data_dir: &Path) -> io::Result<Journal> {
        let dir = data_dir.join("state/tasks");
        fs::create_dir_all(&dir)?;
        remove_temps(&dir);
        Ok(Journal {
            dir,
            unsaved: Mutex::default(),
        })
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    fn unsaved(&self) -> MutexGuard<'_, Vec<String>> {
        self.unsaved.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records that the task starts. False when this task ID was seen before. The entry is
    /// written whole under a temp name and linked into place, so a failed write (ENOSPC)
    /// leaves no entry: the task is claimed again at a later poll.
    pub fn claim(&self, task: &Task) -> io::Result<bool> {
        let path = self.path(&task.id);
        if path.exists() {
            return Ok(false);
        }
        let entry = JournalEntry {
            id: task.id.clone(),
            kind: task.type_name.clone(),
            deployment_id: task.deployment_id.clone(),
            state: "running".into(),
            at: now_secs(),
        };
        let tmp = path.with_extension("tmp");
        let linked = (|| {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(&serde_json::to_vec(&entry).unwrap_or_default())?;
            f.sync_all()?;
            fs::hard_link(&tmp, &path)?;
            sync_dir(&path)
        })();
        let _ = fs::remove_file(&tmp);
        match linked {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Marks the task done. When that cannot be written it is retried by
    /// [`Journal::retry_unsaved`]; [`Journal::is_saved_done`] says which state is on disk.
    pub fn finish(&self, id: &str) -> io::Result<()> {
        let r = self.write_done(id);
        let mut unsaved = self.unsaved();
        unsaved.retain(|u| u != id);
        if r.is_err() {
            unsaved.push(id.to_string());
        }
        r
    }

    fn write_done(&self, id: &str) -> io::Result<()> {
        let path = self.path(id);
        let read = fs::read(&path).ok();
        let mut entry = read
            .and_then(|b| serde_json::from_slice::<JournalEntry>(&b).ok())
            .unwrap_or_else(|| JournalEntry {
                id: id.to_string(),
                kind: String::new(),
                deployment_id: String::new(),
                state: String::new(),
                at: 0,
            });
        entry.state = "done".into();
        entry.at = now_secs();
        write_atomic(&path, &serde_json::to_vec(&entry).unwrap_or_default())
    }

    /// Writes the finishes that failed before (space may have returned).
    pub fn retry_unsaved(&self) {
        let ids: Vec<String> = self.unsaved().clone();
        for id in ids {
            if self.finish(&id).is_ok() {
                log::info!("task {id}: journal entry written after an earlier failure");
            }
        }
    }

    /// True when the journal on disk says the task is done.
    pub fn is_saved_done(&self, id: &str) -> bool {
        let on_disk = fs::read(self.path(id)).ok();
        let entry = on_disk.and_then(|b| serde_json::from_slice::<JournalEntry>(&b).ok());
        entry.is_some_and(|e| e.state == "done") && !self.unsaved().iter().any(|u| u == id)
    }

    /// Tasks that were running when the agent last stopped; an entry that cannot be read
    /// (empty or corrupt after a full disk or a crash) counts as one.
    pub fn interrupted(&self) -> Vec<JournalEntry> {
        self.entries()
            .into_iter()
            .filter(|e| e.state != "done")
            .collect()
    }

    fn entries(&self) -> Vec<JournalEntry> {
        let Ok(rd) = fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let read = |p: &Path| -> Option<JournalEntry> {
            let id = p.file_stem()?.to_str()?.to_string();
            let e = fs::read(p)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            Some(e.unwrap_or(JournalEntry {
                id,
                kind: "unknown (unreadable journal entry)".into(),
                deployment_id: String::new(),
                state: "running".into(),
                at: now_secs(),
            }))
        };
        rd.flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .filter_map(|p| read(&p))
            .collect()
    }

    /// Forgets finished tasks older than `age` (the server stopped listing them long ago).
    pub fn prune(&self, age: Duration) {
        let cutoff = now_secs().saturating_sub(age.as_secs());
        for e in self.entries() {
            if e.state == "done" && e.at < cutoff {
                let _ = fs::remove_file(self.path(&e.id));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::fake::temp_dir;

    fn task(id: &str) -> Task {
        Task {
            id: id.into(),
            type_name: "build".into(),
            ..Task::default()
        }
    }

    #[test]
    fn claims_once_and_remembers_interrupted_tasks() {
        let d = temp_dir("journal");
        let j = Journal::open(&d).unwrap();
        assert!(j.claim(&task("t1")).unwrap());
        assert!(!j.claim(&task("t1")).unwrap());
        let j = Journal::open(&d).unwrap();
        assert_eq!(j.interrupted().len(), 1);
        j.finish("t1").unwrap();
        assert!(j.interrupted().is_empty() && j.is_saved_done("t1"));
        assert!(!j.claim(&task("t1")).unwrap());
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn an_empty_or_corrupt_entry_counts_as_interrupted_and_temps_go() {
        let d = temp_dir("journal-corrupt");
        let dir = d.join("state/tasks");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("t2.json"), "").unwrap();
        fs::write(dir.join("t3.json"), "{\"id\":").unwrap();
        fs::write(dir.join("t4.tmp"), "").unwrap();
        let j = Journal::open(&d).unwrap();
        let mut ids: Vec<String> = j.interrupted().into_iter().map(|e| e.id).collect();
        ids.sort();
        assert_eq!(ids, ["t2", "t3"]);
        assert!(!dir.join("t4.tmp").exists());
        j.finish("t2").unwrap();
        assert_eq!(j.interrupted().len(), 1);
        let _ = fs::remove_dir_all(&d);
    }
}
