//! The task journal under DATA_DIR/state/tasks: a task ID is never run twice, and a task
//! interrupted by a crash is reported. A journal write that fails (a full disk) is undone,
//! never left as an empty entry that would make a task look taken. A claim reserves the
//! space of the task's `done` entry (`<id>.reserve`), so the finish lands on a full disk;
//! one that cannot be written all the same is kept in memory and retried until it lands.

use crate::cp::files::{self, remove_temps, sync_dir};
use crate::sys::disk::no_space;
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

/// Room kept for a task's `done` entry from its claim on (an entry is a few hundred bytes).
const RESERVE: usize = 4096;

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
    /// Opens the journal. A full disk that keeps its directory from being created is no
    /// error: it is created at the first claim.
    pub fn open(data_dir: &Path) -> io::Result<Journal> {
        let dir = data_dir.join("state/tasks");
        match files::private_dir(&dir) {
            Err(e) if !no_space(&e) => return Err(e),
            _ => {}
        }
        remove_temps(&dir);
        let j = Journal {
            dir,
            unsaved: Mutex::default(),
        };
        j.remove_stale_reserves();
        Ok(j)
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    fn reserve_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.reserve"))
    }

    fn unsaved(&self) -> MutexGuard<'_, Vec<String>> {
        self.unsaved.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reserves of claims that never completed, or of tasks whose finish landed without them.
    fn remove_stale_reserves(&self) {
        for e in fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.extension().map_or(true, |x| x != "reserve") {
                continue;
            }
            let id = p.file_stem().and_then(|s| s.to_str()).unwrap_or("");
            if self.read(id).map_or(true, |e| e.state == "done") {
                let _ = fs::remove_file(&p);
            }
        }
    }

    /// Records that the task starts. False when this task ID was seen before. The space its
    /// `done` entry needs is reserved first; the entry is written whole under a temp name
    /// and linked into place, so a failed write (ENOSPC) leaves neither entry nor reserve:
    /// the task is claimed again at a later poll.
    pub fn claim(&self, task: &Task) -> io::Result<bool> {
        let path = self.path(&task.id);
        if path.exists() {
            return Ok(false);
        }
        files::private_dir(&self.dir)?;
        let reserve = self.reserve_path(&task.id);
        files::reserve(&reserve, RESERVE)?;
        let entry = JournalEntry {
            id: task.id.clone(),
            kind: task.type_name.clone(),
            deployment_id: task.deployment_id.clone(),
            state: "running".into(),
            at: now_secs(),
        };
        let tmp = path.with_extension("tmp");
        let linked = (|| {
            let mut f = files::create_private(&tmp)?;
            f.write_all(&serde_json::to_vec(&entry).unwrap_or_default())?;
            f.sync_all()?;
            fs::hard_link(&tmp, &path)?;
            sync_dir(&path)
        })();
        let _ = fs::remove_file(&tmp);
        match linked {
            Ok(()) => Ok(true),
            Err(e) => {
                let _ = fs::remove_file(&reserve);
                match e.kind() {
                    io::ErrorKind::AlreadyExists => Ok(false),
                    _ => Err(e),
                }
            }
        }
    }

    /// Undoes the claim of a task that does not run now (it is claimed again later).
    pub fn unclaim(&self, id: &str) {
        let _ = fs::remove_file(self.path(id));
        let _ = fs::remove_file(self.reserve_path(id));
    }

    /// Marks the task done, in the space its claim reserved. When that cannot be written it
    /// is retried by [`Journal::retry_unsaved`]; [`Journal::is_saved_done`] says which state
    /// is on disk.
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
        let mut entry = self.read(id).unwrap_or_else(|| JournalEntry {
            id: id.to_string(),
            kind: String::new(),
            deployment_id: String::new(),
            state: String::new(),
            at: 0,
        });
        entry.state = "done".into();
        entry.at = now_secs();
        let data = serde_json::to_vec(&entry).unwrap_or_default();
        let reserve = self.reserve_path(id);
        files::write_reserved(&reserve, &self.path(id), &data)?;
        let _ = fs::remove_file(&reserve);
        Ok(())
    }

    fn read(&self, id: &str) -> Option<JournalEntry> {
        let on_disk = files::read(&self.path(id)).ok();
        on_disk.and_then(|b| serde_json::from_slice(&b).ok())
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
        self.read(id).is_some_and(|e| e.state == "done") && !self.unsaved().iter().any(|u| u == id)
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
            let e = files::read(p)
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

    /// Forgets finished tasks older than `age` by the wall clock (the server stopped listing
    /// them long ago), but never one `keep` names (its reports are still in the outbox): a
    /// clock that jumps forward cannot let a task whose outcome the server has not seen run
    /// a second time.
    pub fn prune(&self, age: Duration, keep: &dyn Fn(&str) -> bool) {
        let cutoff = now_secs().saturating_sub(age.as_secs());
        for e in self.entries() {
            if e.state == "done" && e.at < cutoff && !keep(&e.id) {
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

    /// A claim reserves the room of its `done` entry; the finish uses it; reserves of claims
    /// that are gone go at the next open. Pruning spares tasks the outbox still holds.
    #[test]
    fn a_claim_reserves_its_finish_and_pruning_spares_undelivered_tasks() {
        let d = temp_dir("journal-reserve");
        let j = Journal::open(&d).unwrap();
        assert!(j.claim(&task("t1")).unwrap());
        let reserve = d.join("state/tasks/t1.reserve");
        assert_eq!(fs::metadata(&reserve).unwrap().len(), RESERVE as u64);
        j.finish("t1").unwrap();
        assert!(!reserve.exists() && j.is_saved_done("t1"));
        assert!(j.claim(&task("t2")).unwrap());
        j.unclaim("t2");
        assert!(!d.join("state/tasks/t2.reserve").exists());
        assert!(j.claim(&task("t2")).unwrap());
        fs::write(d.join("state/tasks/gone.reserve"), "").unwrap();
        let j = Journal::open(&d).unwrap();
        assert!(!d.join("state/tasks/gone.reserve").exists());
        assert!(
            d.join("state/tasks/t2.reserve").exists(),
            "t2 is still running"
        );
        // As if the clock jumped a year forward since both finished.
        j.finish("t2").unwrap();
        for id in ["t1", "t2"] {
            let e = format!(
                r#"{{"id":"{id}","type":"build","deployment_id":"","state":"done","at":1000}}"#
            );
            fs::write(d.join(format!("state/tasks/{id}.json")), e).unwrap();
        }
        j.prune(Duration::from_secs(7 * 24 * 3600), &|id| id == "t1");
        assert!(
            !j.claim(&task("t1")).unwrap(),
            "t1 was pruned while undelivered"
        );
        assert!(j.claim(&task("t2")).unwrap(), "t2 was not pruned");
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
