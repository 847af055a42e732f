//! The campaign's plan: a workload and a fault schedule, both drawn from the seed alone (timing
//! on a real engine varies between replays; what is done, and when, does not).

use crate::faults::Fault;
use crate::rng::Rng;
use std::fmt;
use std::time::Duration;

/// Projects 0..OPS are probed throughout: deploys and read-only tasks only. Project OPS also
/// gets restarts, pauses and cleanups, which stop its app on purpose.
pub const OPS: usize = 3;
pub const PROJECTS: usize = 4;
/// Dependency datasets (each in a few versions) that share the deploy node's small cache.
pub const DATASETS: u64 = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Builder,
    Deploy,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Builder => "builder",
            Role::Deploy => "deploy",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BuildKind {
    /// 40 numbered lines.
    Plain,
    /// This many numbered lines.
    Flood(u32),
    /// NUL, invalid UTF-8, an escape, a build secret printed, and the secret again after
    /// 16 KiB of spaces (where a line is cut).
    Nasty,
    /// A RUN step that fails.
    Broken,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum App {
    Ok,
    /// Exits at once (printing its token to stderr): the deploy fails its health check.
    Crash,
    /// Answers only after the health timeout: the deploy fails.
    Slow,
}

#[derive(Clone, Debug)]
pub enum Work {
    /// A build of the project; the control plane chains it into a deploy when it completes.
    Build { project: usize, kind: BuildKind },
    /// A deploy of the prebuilt app, with a dependency dataset (id, version) and/or a
    /// readwrite one.
    Deploy {
        project: usize,
        app: App,
        dataset: Option<(u64, u64)>,
        rw: bool,
    },
    /// A lifecycle task or cleanup on the deploy node.
    Op { project: usize, kind: &'static str },
    /// An exec or cp session through the deploy node's control channel, as muveectl opens it.
    Session { project: usize, kind: &'static str },
}

#[derive(Clone, Copy, Debug)]
pub enum Trigger {
    Now,
    /// When a task of the role is pending (about to be claimed).
    Claim,
    /// This long after a task of this type started on the node.
    During(&'static str, u64),
}

#[derive(Clone, Debug)]
pub enum FaultSpec {
    Cp {
        route: &'static str,
        fault: Fault,
        ms: u64,
    },
    Kill {
        role: Role,
        trigger: Trigger,
        down_ms: u64,
    },
    /// SIGTERM, and a second one this long after when given; restarted once it exited.
    Term { role: Role, second_ms: Option<u64> },
    /// The role's DATA_DIR filled up (blocks, or inodes) for a while.
    Disk { role: Role, inodes: bool, ms: u64 },
    /// The docker CLI wrapper fails, hangs (`secs`, then fails) or is slow (`secs`) for
    /// these subcommands (`*`: all).
    Docker {
        mode: &'static str,
        secs: u64,
        subs: String,
        ms: u64,
    },
    /// The registry refuses connections.
    Registry { ms: u64 },
}

impl FaultSpec {
    /// How long it disturbs the agents (a restart: until the new process had time to start).
    pub fn span_ms(&self) -> u64 {
        match self {
            FaultSpec::Cp { ms, .. }
            | FaultSpec::Disk { ms, .. }
            | FaultSpec::Docker { ms, .. }
            | FaultSpec::Registry { ms } => *ms,
            FaultSpec::Kill { down_ms, .. } => down_ms + 15_000,
            FaultSpec::Term { .. } => 40_000,
        }
    }
}

#[derive(Clone, Debug)]
pub enum What {
    Work(Work),
    Fault(FaultSpec),
}

#[derive(Clone, Debug)]
pub struct Step {
    pub n: usize,
    pub at_ms: u64,
    pub what: What,
}

pub struct Plan {
    pub seed: u64,
    pub duration: Duration,
    pub steps: Vec<Step>,
}

impl Plan {
    pub fn new(seed: u64, duration: Duration) -> Plan {
        let ms = duration.as_millis() as u64;
        let mut all: Vec<(u64, What)> = workload(&mut Rng::new(seed, 1), ms)
            .into_iter()
            .map(|(t, w)| (t, What::Work(w)))
            .collect();
        let faults = faults(&mut Rng::new(seed, 2), ms);
        all.extend(faults.into_iter().map(|(t, f)| (t, What::Fault(f))));
        all.sort_by_key(|s| s.0);
        let steps = all
            .into_iter()
            .enumerate()
            .map(|(n, (at_ms, what))| Step { n, at_ms, what })
            .collect();
        Plan {
            seed,
            duration,
            steps,
        }
    }

    /// Steps that act on `[from, to]` (ms since the start).
    pub fn window(&self, from: u64, to: u64) -> impl Iterator<Item = &Step> {
        self.steps.iter().filter(move |s| {
            let end = match &s.what {
                What::Fault(f) => s.at_ms + f.span_ms(),
                What::Work(_) => s.at_ms,
            };
            end >= from && s.at_ms <= to
        })
    }
}

fn workload(rng: &mut Rng, duration: u64) -> Vec<(u64, Work)> {
    // Every app starts deployed, so the prober has something to watch from the start.
    let mut out: Vec<(u64, Work)> = (0..PROJECTS)
        .map(|p| {
            let w = Work::Deploy {
                project: p,
                app: App::Ok,
                dataset: None,
                rw: false,
            };
            (500 + 700 * p as u64, w)
        })
        .collect();
    let mut t = 4000.0;
    loop {
        t += rng.exp(4000.0).clamp(300.0, 15_000.0);
        if t >= duration as f64 {
            break;
        }
        out.extend(one_work(rng).into_iter().map(|(d, w)| (t as u64 + d, w)));
    }
    out
}

/// One arrival: a work item (a pause brings its unpause, some seconds later).
fn one_work(rng: &mut Rng) -> Vec<(u64, Work)> {
    let project = rng.range(0, PROJECTS as u64) as usize;
    match rng.weighted(&[(35, 0), (22, 1), (18, 2), (15, 3), (10, 4)]) {
        0 => {
            let flood = rng.range(5_000, 30_000) as u32;
            let kind = rng.weighted(&[
                (45, BuildKind::Plain),
                (20, BuildKind::Flood(flood)),
                (20, BuildKind::Nasty),
                (15, BuildKind::Broken),
            ]);
            vec![(0, Work::Build { project, kind })]
        }
        1 => {
            let app = rng.weighted(&[(60, App::Ok), (20, App::Crash), (20, App::Slow)]);
            let ds = (rng.range(0, DATASETS), rng.range(1, 4));
            let dataset = rng.chance(0.6).then_some(ds);
            let rw = rng.chance(0.3);
            let deploy = Work::Deploy {
                project,
                app,
                dataset,
                rw,
            };
            vec![(0, deploy)]
        }
        2 => {
            let kind = rng.weighted(&[(40, "runtime_logs"), (30, "env"), (30, "describe")]);
            vec![(0, Work::Op { project, kind })]
        }
        4 => {
            let kind = rng.weighted(&[
                (30, "exec"),
                (20, "exec-close"),
                (20, "cp-down"),
                (15, "cp-down-missing"),
                (15, "cp-up"),
            ]);
            vec![(0, Work::Session { project, kind })]
        }
        _ => {
            let project = OPS;
            match rng.weighted(&[(40, "restart"), (35, "pause"), (25, "cleanup")]) {
                "pause" => vec![
                    (
                        0,
                        Work::Op {
                            project,
                            kind: "pause",
                        },
                    ),
                    (
                        rng.range(3000, 20_000),
                        Work::Op {
                            project,
                            kind: "unpause",
                        },
                    ),
                ],
                kind => vec![(0, Work::Op { project, kind })],
            }
        }
    }
}

fn faults(rng: &mut Rng, duration: u64) -> Vec<(u64, FaultSpec)> {
    // Seconds to minutes; never so long that a short campaign is one fault.
    let max_ms = (duration / 3).clamp(5_000, 180_000);
    let mut out = Vec::new();
    let mut ends: Vec<u64> = Vec::new();
    let mut t = 6000.0;
    loop {
        t += rng.exp(9000.0).max(1000.0);
        if t as u64 + 2000 >= duration {
            break;
        }
        // At most two at once: the agents must get work done between faults too.
        ends.retain(|e| *e as f64 > t);
        if ends.len() >= 2 {
            t = ends.iter().copied().min().unwrap_or(0) as f64;
            continue;
        }
        let f = one_fault(rng, max_ms.min(duration - t as u64));
        ends.push(t as u64 + f.span_ms());
        out.push((t as u64, f));
    }
    out
}

fn one_fault(rng: &mut Rng, max_ms: u64) -> FaultSpec {
    let role = rng.weighted(&[(1, Role::Builder), (1, Role::Deploy)]);
    let short = max_ms.min(60_000);
    match rng.weighted(&[(45, 0), (14, 1), (7, 2), (10, 3), (14, 4), (10, 5)]) {
        0 => cp_fault(rng, max_ms),
        1 => {
            let kind = match role {
                Role::Builder => "build",
                Role::Deploy => rng.weighted(&[(70, "deploy"), (15, "restart"), (15, "cleanup")]),
            };
            let delay = rng.range(0, 4000);
            let trigger = rng.weighted(&[
                (30, Trigger::Now),
                (25, Trigger::Claim),
                (45, Trigger::During(kind, delay)),
            ]);
            let down_ms = rng.range(0, 5000);
            FaultSpec::Kill {
                role,
                trigger,
                down_ms,
            }
        }
        2 => {
            let second = rng.range(500, 8000);
            let second_ms = rng.chance(0.4).then_some(second);
            FaultSpec::Term { role, second_ms }
        }
        3 => FaultSpec::Disk {
            role,
            inodes: rng.chance(0.4),
            ms: rng.log_range(3000, short),
        },
        4 => docker_fault(rng, short),
        _ => FaultSpec::Registry {
            ms: rng.log_range(3000, max_ms.min(90_000)),
        },
    }
}

fn cp_fault(rng: &mut Rng, max_ms: u64) -> FaultSpec {
    let route = rng.weighted(&[
        (15, "poll"),
        (20, "complete"),
        (20, "logs"),
        (5, "register"),
        (5, "config"),
        (10, "metrics"),
        (5, "health"),
        (5, "control"),
        (15, "all"),
    ]);
    let stall = Fault::Hang(Duration::from_millis(rng.range(15_000, 70_000)));
    let slow = Fault::Hang(Duration::from_millis(rng.range(300, 3000)));
    let code = rng.weighted(&[(20, 500), (15, 502), (10, 503), (10, 404), (5, 413)]);
    let fault = match rng.weighted(&[(60, 0), (10, 1), (5, 2), (10, 3), (8, 4), (7, 5)]) {
        0 => Fault::status(code),
        1 => Fault::Html,
        2 => Fault::Garbage,
        3 => Fault::Reset,
        4 => stall,
        _ => slow,
    };
    let ms = rng.log_range(2000, max_ms);
    FaultSpec::Cp { route, fault, ms }
}

const DOCKER_SUBS: &[&str] = &[
    "build", "push", "run", "ps", "inspect", "rename", "rm", "stop", "start", "logs", "restart",
    "pull", "login", "image", "port", "stats", "*",
];

fn docker_fault(rng: &mut Rng, max_ms: u64) -> FaultSpec {
    let mode = rng.weighted(&[(40, "fail"), (30, "slow"), (30, "hang")]);
    let secs = match mode {
        "slow" => rng.range(1, 5),
        "hang" => rng.range(10, 45),
        _ => 0,
    };
    let n = rng.range(1, 4) as usize;
    let mut subs: Vec<&str> = (0..n)
        .map(|_| DOCKER_SUBS[rng.range(0, DOCKER_SUBS.len() as u64) as usize])
        .collect();
    subs.sort_unstable();
    subs.dedup();
    FaultSpec::Docker {
        mode,
        secs,
        subs: subs.join(","),
        ms: rng.log_range(2000, max_ms),
    }
}

impl fmt::Display for Work {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Work::Build { project, kind } => write!(f, "build p{project} {kind:?}"),
            Work::Deploy {
                project,
                app,
                dataset,
                rw,
            } => {
                write!(f, "deploy p{project} app={app:?}")?;
                if let Some((id, v)) = dataset {
                    write!(f, " dataset=ds{id}@{v}")?;
                }
                if *rw {
                    write!(f, " +readwrite")?;
                }
                Ok(())
            }
            Work::Op { project, kind } => write!(f, "{kind} p{project}"),
            Work::Session { project, kind } => write!(f, "session {kind} p{project}"),
        }
    }
}

impl fmt::Display for FaultSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = |ms: &u64| format!("{:.1}s", *ms as f64 / 1000.0);
        match self {
            FaultSpec::Cp { route, fault, ms } => {
                write!(f, "FAULT cp {route} answers {} for {}", fault.name(), s(ms))
            }
            FaultSpec::Kill {
                role,
                trigger,
                down_ms,
            } => write!(
                f,
                "FAULT kill -9 {} ({trigger:?}), restart after {}",
                role.name(),
                s(down_ms)
            ),
            FaultSpec::Term { role, second_ms } => match second_ms {
                Some(ms) => write!(f, "FAULT SIGTERM {}, again after {}", role.name(), s(ms)),
                None => write!(f, "FAULT SIGTERM {}", role.name()),
            },
            FaultSpec::Disk { role, inodes, ms } => {
                let what = if *inodes { "inodes" } else { "blocks" };
                write!(
                    f,
                    "FAULT {} DATA_DIR out of {what} for {}",
                    role.name(),
                    s(ms)
                )
            }
            FaultSpec::Docker {
                mode,
                secs,
                subs,
                ms,
            } => write!(f, "FAULT docker {mode} {secs}s [{subs}] for {}", s(ms)),
            FaultSpec::Registry { ms } => write!(f, "FAULT registry refuses for {}", s(ms)),
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let at = self.at_ms as f64 / 1000.0;
        match &self.what {
            What::Work(w) => write!(f, "{at:>8.3}s #{:<4} {w}", self.n),
            What::Fault(x) => write!(f, "{at:>8.3}s #{:<4} {x}", self.n),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_gives_the_same_plan() {
        let show = |seed| {
            let p = Plan::new(seed, Duration::from_secs(300));
            p.steps.iter().map(|s| s.to_string()).collect::<Vec<_>>()
        };
        assert_eq!(show(7), show(7));
        assert_ne!(show(7), show(8));
        assert!(show(7).iter().any(|s| s.contains("FAULT")));
    }
}
