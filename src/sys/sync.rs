//! Concurrency primitives shared by the roles: a counting semaphore (build slots), the task
//! slots, one lock per key (an app, a dataset), background jobs that can be waited for by
//! key, and file locks that tell a live process's files from a dead one's. The semaphore and
//! the locks are waited for inside tasks: on the agent's bell, ending on the tasks' cancel
//! (`sys::wait`).

use crate::sys::bell::Bell;
use crate::sys::wait::{self, Canceled, Stop, Woke};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// A counting semaphore (BUILDER_MAX_CONCURRENT).
pub struct Semaphore {
    free: Mutex<usize>,
    bell: Arc<Bell>,
}

pub struct Permit<'a>(&'a Semaphore);

impl Semaphore {
    pub fn new(n: usize, bell: Arc<Bell>) -> Semaphore {
        Semaphore {
            free: Mutex::new(n.max(1)),
            bell,
        }
    }
    /// Waits for a slot, or until the tasks are canceled.
    pub fn acquire(&self) -> Result<Permit<'_>, Canceled> {
        let take = || {
            let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
            let got = *free > 0;
            *free -= usize::from(got);
            got
        };
        match wait::until(&self.bell, None, Stop::Cancel, take) {
            Woke::Ready => Ok(Permit(self)),
            Woke::Stopped | Woke::TimedOut => Err(Canceled),
        }
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        *self.0.free.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        self.0.bell.ring();
    }
}

/// Tasks running at once (MAX_CONCURRENT_TASKS): the loop takes a task only while fewer
/// run. A task waiting for a keyed lock gives its slot back while it waits, so tasks queued
/// behind one busy app never keep the loop from polling other apps' work.
pub struct Slots {
    used: AtomicUsize,
    /// A slot was given back since the loop last looked: it polls again at once.
    freed: AtomicBool,
    bell: Arc<Bell>,
}

impl Slots {
    pub fn new(bell: Arc<Bell>) -> Slots {
        Slots {
            used: AtomicUsize::new(0),
            freed: AtomicBool::new(false),
            bell,
        }
    }

    pub fn used(&self) -> usize {
        self.used.load(Ordering::SeqCst)
    }

    pub fn take(&self) {
        self.used.fetch_add(1, Ordering::SeqCst);
    }

    /// Frees a slot and wakes the loop (a `run-task` holds none: nothing to give back).
    pub fn give_back(&self) {
        let _ = self
            .used
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        self.freed.store(true, Ordering::SeqCst);
        self.bell.ring();
    }

    /// True once after a slot was given back.
    pub fn take_freed(&self) -> bool {
        self.freed.swap(false, Ordering::SeqCst)
    }
}

/// One lock per key (a domain prefix, a dataset): serializes work on the same thing. Work
/// holding a [`Turn`] of the key takes the lock in the order the turns were given.
pub struct KeyedLocks {
    held: Mutex<HashSet<String>>,
    turns: Arc<Mutex<Turns>>,
    bell: Arc<Bell>,
}

/// The turns waiting per key, oldest first.
#[derive(Default)]
struct Turns {
    waiting: HashMap<String, VecDeque<u64>>,
    next: u64,
}

impl Turns {
    fn leave(&mut self, key: &str, id: u64) {
        if let Some(q) = self.waiting.get_mut(key) {
            q.retain(|x| *x != id);
            if q.is_empty() {
                self.waiting.remove(key);
            }
        }
    }

    fn waits(&self, key: &str, id: u64) -> bool {
        self.waiting.get(key).is_some_and(|q| q.contains(&id))
    }

    fn first(&self, key: &str) -> Option<u64> {
        self.waiting.get(key).and_then(|q| q.front().copied())
    }
}

/// A place in a key's line (a task of an app, taken when the task is claimed, so that the
/// app's tasks change it in the order the control plane gave them). It is over once its
/// holder's first section under the key ran, or when dropped.
pub struct Turn {
    key: String,
    id: u64,
    turns: Arc<Mutex<Turns>>,
    bell: Arc<Bell>,
}

impl Turn {
    pub fn key(&self) -> &str {
        &self.key
    }

    fn leave(&self) {
        let mut t = self.turns.lock().unwrap_or_else(|e| e.into_inner());
        t.leave(&self.key, self.id);
        drop(t);
        self.bell.ring();
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        self.leave();
    }
}

/// Holds a key until dropped (also when the work under it panics).
struct Held<'a> {
    locks: &'a KeyedLocks,
    key: &'a str,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        let mut held = self.locks.held.lock().unwrap_or_else(|e| e.into_inner());
        held.remove(self.key);
        drop(held);
        self.locks.bell.ring();
    }
}

impl KeyedLocks {
    pub fn new(bell: Arc<Bell>) -> KeyedLocks {
        KeyedLocks {
            held: Mutex::default(),
            turns: Arc::default(),
            bell,
        }
    }

    /// A place in `key`'s line, after every turn given before it.
    pub fn turn(&self, key: &str) -> Turn {
        let mut t = self.turns.lock().unwrap_or_else(|e| e.into_inner());
        let id = t.next;
        t.next += 1;
        t.waiting.entry(key.to_string()).or_default().push_back(id);
        Turn {
            key: key.to_string(),
            id,
            turns: self.turns.clone(),
            bell: self.bell.clone(),
        }
    }

    /// True when the key was free (and `turn`, if any and not over, first in its line) and
    /// is now ours.
    fn take(&self, key: &str, turn: Option<&Turn>) -> bool {
        if let Some(t) = turn {
            let turns = self.turns.lock().unwrap_or_else(|e| e.into_inner());
            if turns.waits(key, t.id) && turns.first(key) != Some(t.id) {
                return false;
            }
        }
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.insert(key.to_string())
    }

    /// Runs `f` under the key's lock, waiting for it unless the tasks are canceled first;
    /// while another holder makes it wait, the caller's task slot is given back (and taken
    /// again once the wait ends).
    #[cfg(test)]
    pub fn with<T>(&self, key: &str, slots: &Slots, f: impl FnOnce() -> T) -> Result<T, Canceled> {
        self.with_turn(key, None, slots, f)
    }

    /// [`Self::with`], in `turn`'s order among the key's turns; the turn is over after `f`.
    pub fn with_turn<T>(
        &self,
        key: &str,
        turn: Option<&Turn>,
        slots: &Slots,
        f: impl FnOnce() -> T,
    ) -> Result<T, Canceled> {
        if !self.take(key, turn) {
            slots.give_back();
            let woke = wait::until(&self.bell, None, Stop::Cancel, || self.take(key, turn));
            slots.take();
            if woke != Woke::Ready {
                return Err(Canceled);
            }
        }
        let held = Held { locks: self, key };
        let out = f();
        if let Some(t) = turn {
            t.leave();
        }
        drop(held);
        Ok(out)
    }

    /// Runs `f` under the key's lock if nobody holds it; None (without waiting) otherwise.
    pub fn try_with<T>(&self, key: &str, f: impl FnOnce() -> T) -> Option<T> {
        if !self.take(key, None) {
            return None;
        }
        let _held = Held { locks: self, key };
        Some(f())
    }
}

/// Threads doing work after a task reported (draining an old container), by key.
#[derive(Default)]
pub struct Jobs {
    list: Mutex<Vec<(String, JoinHandle<()>)>>,
}

impl Jobs {
    /// Starts `work` on a thread named `name`; the error says why no thread could start.
    pub fn spawn(
        &self,
        key: &str,
        name: String,
        work: impl FnOnce() + Send + 'static,
    ) -> std::io::Result<()> {
        let mut list = self.list.lock().unwrap_or_else(|e| e.into_inner());
        list.retain(|(_, h)| !h.is_finished());
        let h = std::thread::Builder::new().name(name).spawn(work)?;
        list.push((key.to_string(), h));
        Ok(())
    }

    /// True while a job of `key` is still running.
    pub fn busy(&self, key: &str) -> bool {
        let list = self.list.lock().unwrap_or_else(|e| e.into_inner());
        list.iter().any(|(k, h)| k == key && !h.is_finished())
    }

    /// Waits for the jobs of one key, or all of them.
    pub fn wait(&self, key: Option<&str>) {
        let mine: Vec<JoinHandle<()>> = {
            let mut list = self.list.lock().unwrap_or_else(|e| e.into_inner());
            let (mine, rest) = std::mem::take(&mut *list)
                .into_iter()
                .partition(|(k, _)| key.map_or(true, |x| x == k));
            *list = rest;
            mine.into_iter().map(|(_, h)| h).collect()
        };
        for h in mine {
            let _ = h.join();
        }
    }
}

/// An exclusive `flock` on a file, held until dropped (or the process dies, however it
/// dies: the kernel releases it). Unlike a PID, it cannot be mistaken for another process's.
/// A lock made by [`FileLock::create`] removes its file when dropped.
pub struct FileLock {
    _file: std::fs::File,
    owned: Option<std::path::PathBuf>,
}

impl Drop for FileLock {
    fn drop(&mut self) {
        if let Some(p) = &self.owned {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl FileLock {
    /// Creates `path` already locked: the lock is taken on a temp name and the file renamed
    /// into place, so nobody can see it unlocked.
    pub fn create(path: &std::path::Path) -> std::io::Result<FileLock> {
        use std::os::unix::fs::OpenOptionsExt;
        let tmp = path.with_extension(format!("tmp-{}", random_u64()));
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        let mut lock = FileLock::take(f)?.ok_or_else(|| std::io::Error::other("lock is taken"))?;
        std::fs::rename(&tmp, path)?;
        lock.owned = Some(path.to_path_buf());
        Ok(lock)
    }

    /// Some(lock) when nobody holds `path`'s lock.
    pub fn try_open(path: &std::path::Path) -> std::io::Result<Option<FileLock>> {
        FileLock::take(std::fs::File::open(path)?)
    }

    /// The lock of `path`, created when missing: waits for it (`wait`), or None when it is
    /// taken. A holder may delete the file (see [`FileLock::delete`]); a lock won on a
    /// deleted file is let go and taken again on the new one.
    pub fn at(path: &std::path::Path, wait: bool) -> std::io::Result<Option<FileLock>> {
        use std::os::unix::fs::MetadataExt;
        loop {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(path)?;
            let Some(lock) = FileLock::flock(f, wait)? else {
                return Ok(None);
            };
            let (held, now) = (lock._file.metadata()?, std::fs::metadata(path));
            if now.is_ok_and(|m| m.ino() == held.ino() && m.dev() == held.dev()) {
                return Ok(Some(lock));
            }
        }
    }

    /// Deletes the locked file (taken with [`FileLock::at`]) before letting it go.
    pub fn delete(self, path: &std::path::Path) {
        let _ = std::fs::remove_file(path);
    }

    fn take(f: std::fs::File) -> std::io::Result<Option<FileLock>> {
        FileLock::flock(f, false)
    }

    fn flock(f: std::fs::File, wait: bool) -> std::io::Result<Option<FileLock>> {
        use std::os::unix::io::AsRawFd;
        let op = if wait {
            libc::LOCK_EX
        } else {
            libc::LOCK_EX | libc::LOCK_NB
        };
        // SAFETY: flock on a descriptor we own.
        let r = loop {
            let r = unsafe { libc::flock(f.as_raw_fd(), op) };
            if r == 0 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                break r;
            }
        };
        if r == 0 {
            return Ok(Some(FileLock {
                _file: f,
                owned: None,
            }));
        }
        match std::io::Error::last_os_error() {
            e if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(None),
            e => Err(e),
        }
    }
}

/// The pid of the process holding a `flock` on `path`, as the kernel lists it in
/// `/proc/locks`; None when none is listed or its pid is not visible (another pid
/// namespace shows 0).
pub fn flock_holder(path: &std::path::Path) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    let dev = m.dev();
    // glibc's major()/minor(): /proc/locks prints them in hex, the inode in decimal.
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    let id = format!("{major:02x}:{minor:02x}:{}", m.ino());
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    locks.lines().find_map(|line| {
        // `1: FLOCK  ADVISORY  WRITE 12923 00:5c:2 0 EOF`; waiters have `->` after the number.
        let f: Vec<&str> = line.split_whitespace().collect();
        let held = f.get(1) == Some(&"FLOCK") && f.get(5) == Some(&id.as_str());
        held.then(|| f.get(4)?.parse().ok())
            .flatten()
            .filter(|pid| *pid > 0)
    })
}

/// A random u64 without a rand crate: RandomState is seeded per process and per call.
pub fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_task_waiting_for_a_keyed_lock_holds_no_slot() {
        let (locks, slots) = (
            Arc::new(KeyedLocks::new(Arc::default())),
            Arc::new(Slots::new(Arc::default())),
        );
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (held_tx, held) = std::sync::mpsc::channel::<()>();
        let (l2, s2) = (locks.clone(), slots.clone());
        slots.take();
        let holder = std::thread::spawn(move || {
            l2.with("app", &s2, || {
                held_tx.send(()).unwrap();
                rx.recv().unwrap()
            })
            .unwrap();
        });
        held.recv().unwrap();
        assert!(!slots.take_freed(), "the holder waited for nobody");
        slots.take();
        let (l3, s3) = (locks.clone(), slots.clone());
        let waiter = std::thread::spawn(move || l3.with("app", &s3, || s3.used()));
        // The waiter gives its slot back (the count first, then the flag the loop reads)
        // while the holder keeps the lock.
        while !slots.take_freed() {
            std::thread::yield_now();
        }
        assert_eq!(slots.used(), 1);
        tx.send(()).unwrap();
        holder.join().unwrap();
        assert_eq!(
            waiter.join().unwrap().unwrap(),
            2,
            "the slot is taken again with the lock"
        );
    }

    #[test]
    fn semaphore_hands_a_freed_slot_to_a_waiter() {
        let sem = Arc::new(Semaphore::new(1, Arc::default()));
        let held = sem.acquire().unwrap();
        let s2 = sem.clone();
        let waiter = std::thread::spawn(move || s2.acquire().is_ok());
        std::thread::sleep(Duration::from_millis(50));
        drop(held);
        assert!(waiter.join().unwrap());
    }

    #[test]
    fn turns_take_a_key_in_the_order_they_were_given() {
        let bell = Arc::new(Bell::default());
        let locks = Arc::new(KeyedLocks::new(bell.clone()));
        let slots = Arc::new(Slots::new(bell));
        let (first, second) = (locks.turn("app"), locks.turn("app"));
        let other = locks.turn("web");
        let order = Arc::new(Mutex::new(Vec::new()));
        let (l, s, o) = (locks.clone(), slots.clone(), order.clone());
        let later = std::thread::spawn(move || {
            l.with_turn("app", Some(&second), &s, || {
                o.lock().unwrap().push("second")
            })
        });
        std::thread::sleep(std::time::Duration::from_millis(100));
        // Another key's turn, and work without a turn, do not wait for "app"'s line.
        assert_eq!(locks.with_turn("web", Some(&other), &slots, || 1), Ok(1));
        assert_eq!(locks.try_with("app", || 2), Some(2));
        assert!(order.lock().unwrap().is_empty(), "second went before first");
        let _ = locks.with_turn("app", Some(&first), &slots, || {
            order.lock().unwrap().push("first")
        });
        later.join().unwrap().unwrap();
        assert_eq!(*order.lock().unwrap(), ["first", "second"]);
        // A turn dropped unused lets the next one go.
        let (dropped, next) = (locks.turn("app"), locks.turn("app"));
        drop(dropped);
        assert_eq!(locks.with_turn("app", Some(&next), &slots, || 3), Ok(3));
        // Once over, a turn takes the key again like work without one (a failed deploy
        // forgets its mounts under the app's lock), even with later turns waiting.
        let _waiting = locks.turn("app");
        assert_eq!(locks.with_turn("app", Some(&next), &slots, || 4), Ok(4));
    }

    #[test]
    fn a_freed_key_goes_to_its_waiter_other_keys_never_wait() {
        let locks = Arc::new(KeyedLocks::new(Arc::default()));
        let slots = Arc::new(Slots::new(Arc::default()));
        let (l, s2, started) = (locks.clone(), slots.clone(), std::time::Instant::now());
        let got = locks.with("app", &slots, || {
            let waiter = std::thread::spawn(move || l.with("app", &s2, || started.elapsed()));
            assert_eq!(locks.try_with("app", || ()), None, "held");
            assert_eq!(locks.with("other", &slots, || 1), Ok(1));
            std::thread::sleep(Duration::from_millis(100));
            waiter
        });
        let waited = got.unwrap().join().unwrap().unwrap();
        assert!(waited >= Duration::from_millis(100), "{waited:?}");
        assert!(waited < Duration::from_secs(5), "{waited:?}");
        assert_eq!(locks.try_with("app", || 2), Some(2), "released");
    }

    /// The kernel names the process holding a directory's lock; a free one has no holder.
    #[test]
    fn the_holder_of_a_lock_is_read_from_the_kernel() {
        let d = crate::sys::fake::temp_dir("flock-holder");
        assert_eq!(flock_holder(&d), None);
        let lock = FileLock::try_open(&d).unwrap().unwrap();
        assert_eq!(flock_holder(&d), Some(std::process::id()));
        drop(lock);
        assert_eq!(flock_holder(&d), None);
        let _ = std::fs::remove_dir_all(&d);
    }
}
