//! What the campaign did and saw, with times in ms since it began; and the stop signal every
//! thread of the campaign sleeps on.

use crate::plan::Role;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

pub struct Clock {
    t0: Instant,
    wall0: SystemTime,
}

impl Clock {
    pub fn new() -> Clock {
        Clock {
            t0: Instant::now(),
            wall0: SystemTime::now(),
        }
    }
    pub fn ms(&self) -> u64 {
        self.t0.elapsed().as_millis() as u64
    }
    /// A wall-clock time (the control plane's records) in ms since the start.
    pub fn ms_of(&self, t: SystemTime) -> u64 {
        t.duration_since(self.wall0)
            .map_or(0, |d| d.as_millis() as u64)
    }
    /// The start, in ms since 1970 (to read the docker wrapper's log).
    pub fn epoch_ms(&self) -> u64 {
        self.wall0
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    }
    pub fn at(&self, ms: u64) -> Instant {
        self.t0 + Duration::from_millis(ms)
    }
}

/// Set once (the campaign's end, or SIGINT/SIGTERM); sleepers wake at once.
#[derive(Default)]
pub struct Stop {
    flag: Mutex<bool>,
    cv: Condvar,
}

impl Stop {
    pub fn stop(&self) {
        *self.flag.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.cv.notify_all();
    }
    pub fn stopped(&self) -> bool {
        *self.flag.lock().unwrap_or_else(|e| e.into_inner())
    }
    /// Sleeps `d` unless stopped meanwhile; true when stopped.
    pub fn sleep(&self, d: Duration) -> bool {
        self.sleep_until(Instant::now() + d)
    }
    pub fn sleep_until(&self, t: Instant) -> bool {
        let mut g = self.flag.lock().unwrap_or_else(|e| e.into_inner());
        while !*g {
            let left = t.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            g = self
                .cv
                .wait_timeout(g, left)
                .map_or_else(|e| e.into_inner().0, |r| r.0);
        }
        true
    }
}

#[derive(Clone, Debug)]
pub enum Ev {
    /// A plan step began (a fault: it is being injected).
    Step(usize),
    /// A timed fault ended.
    FaultEnd(usize),
    /// A task the campaign enqueued.
    Task {
        step: usize,
        id: String,
        kind: String,
        project: usize,
        deployment: String,
    },
    AgentUp {
        role: Role,
        pid: u32,
    },
    /// The agent is going or gone (killed, asked to stop, or exited by itself).
    AgentDown {
        role: Role,
        pid: u32,
        how: String,
    },
    /// An HTTP probe of a probed app on the port the control plane routes to.
    Probe {
        project: usize,
        port: u16,
        ok: bool,
    },
    /// Whether a deploy reported completed answered with its own marker.
    Answer {
        task: String,
        ok: bool,
        detail: String,
    },
    /// Still running long after SIGTERM (then killed).
    Stuck {
        role: Role,
        pid: u32,
    },
    /// An exec or cp session ended as it must (ok), or did not.
    Session {
        step: usize,
        ok: bool,
        detail: String,
    },
    Rss {
        role: Role,
        pid: u32,
        kib: u64,
    },
    /// A world-readable file under DATA_DIR holding a secret.
    ReadableSecret {
        path: String,
    },
    Note(String),
}

#[derive(Clone, Debug)]
pub struct Event {
    pub ms: u64,
    pub ev: Ev,
}

pub struct History {
    pub clock: Clock,
    events: Mutex<Vec<Event>>,
}

impl History {
    pub fn new() -> History {
        History {
            clock: Clock::new(),
            events: Mutex::default(),
        }
    }
    pub fn push(&self, ev: Ev) {
        let ms = self.clock.ms();
        self.lock().push(Event { ms, ev });
    }
    pub fn note(&self, text: String) {
        println!("{:>8.3}s   {text}", self.clock.ms() as f64 / 1000.0);
        self.push(Ev::Note(text));
    }
    pub fn events(&self) -> Vec<Event> {
        self.lock().clone()
    }
    fn lock(&self) -> MutexGuard<'_, Vec<Event>> {
        self.events.lock().unwrap_or_else(|e| e.into_inner())
    }
}
