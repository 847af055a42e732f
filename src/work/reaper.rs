//! Reaping (deploy role): every few minutes, removes containers of ours that no current
//! deployment of this node owns: the leftovers of a replacement that was interrupted, and
//! the apps of a cleanup that never finished (see `cleanups`).
//!
//! "Ours" is strict: labelled `muvee.managed=true` and `muvee.node=<NODE_NAME>` (so another
//! agent on the same engine, or containers of an older muvee-agent, are never touched), with
//! a `muvee.domain_prefix`. The listing filters on the label: unlabelled containers (the Go
//! agent's, anybody else's) are never even looked at. Among ours, for an app `p`:
//!
//! * `muvee-<p>`, the current container, is owned, running or stopped (a paused app is a
//!   stopped one) — unless a cleanup of `p` started and never finished.
//! * `muvee-<p>-old-<id>`, set aside by a replacement, is owned while that replacement or the
//!   old container's drain is under way (checked under the app's deploy lock just before
//!   removal), and whenever `muvee-<p>` is not running: it may be what still serves, or the
//!   only copy left, and the next deploy of `p` takes it back or retires it. It is a leftover
//!   only once the current container runs.
//! * Any other name is left alone: we do not know what it is.
//!
//! A container is removed only after it was seen unowned, round after round, for the whole
//! REAP_GRACE (a rename leaves no timestamp, so its creation time says nothing about when
//! it was set aside). The agent restarting starts the clock again.

use crate::config::Config;
use crate::sys::docker::{Docker, PsRow};
use crate::work::ctx::Shared;
use crate::work::{cleanups, datasets, deployer};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// How often the reaper looks: twice per grace, between 1 s and 5 minutes.
pub fn interval(grace: Duration) -> Duration {
    (grace / 2).clamp(Duration::from_secs(1), Duration::from_secs(300))
}

/// What the reaper remembers between rounds: since when each candidate (by id) is unowned.
#[derive(Default)]
pub struct Reaper {
    seen: HashMap<String, Instant>,
}

impl Reaper {
    /// One round; returns the names of the containers it removed.
    pub fn round(&mut self, cfg: &Config, shared: &Shared) -> Vec<String> {
        let docker = shared.docker(cfg);
        let Ok(rows) = docker.managed() else {
            return Vec::new();
        };
        let cleaning = cleanups::unfinished(&cfg.data_dir);
        let now = Instant::now();
        let candidates: Vec<PsRow> = unowned(&rows, &cfg.node_name, &cleaning)
            .into_iter()
            .cloned()
            .collect();
        self.seen
            .retain(|id, _| candidates.iter().any(|c| c.id == *id));
        let mut removed = Vec::new();
        for c in candidates {
            let since = *self.seen.entry(c.id.clone()).or_insert(now);
            if now.duration_since(since) < cfg.reap_grace {
                continue;
            }
            if remove_if_unowned(cfg, shared, &docker, &c) {
                self.seen.remove(&c.id);
                removed.push(c.name);
            }
        }
        datasets::sweep_mounts(cfg, shared);
        removed
    }
}

/// Removes `c` under its app's deploy lock after checking again that nothing owns it; skips
/// it (for the next round) while a deploy, cleanup or drain of the app is under way.
fn remove_if_unowned(cfg: &Config, shared: &Shared, docker: &Docker, c: &PsRow) -> bool {
    let prefix = c.domain_prefix.as_str();
    if shared.retiring.busy(prefix) {
        return false;
    }
    let key = deployer::lock_key(prefix);
    let removed = shared.locks.try_with(&key, || {
        let rows = docker.managed().ok()?;
        let cleaning = cleanups::unfinished(&cfg.data_dir);
        let still = unowned(&rows, &cfg.node_name, &cleaning);
        if !still.iter().any(|s| s.id == c.id) {
            return None;
        }
        match docker.remove(&c.id) {
            Ok(()) => {
                log::info!(
                    "reaper: removed {} (left over, owned by no deployment)",
                    c.name
                );
                remove_mounts(cfg, &rows, c);
                Some(())
            }
            Err(e) => {
                log::warn!("reaper: cannot remove {}: {e}", c.name);
                None
            }
        }
    });
    removed.flatten().is_some()
}

/// The dataset mount dir of the removed container's deployment, unless another container
/// of ours still runs that deployment.
fn remove_mounts(cfg: &Config, rows: &[PsRow], gone: &PsRow) {
    let dep = gone.deployment_id.as_str();
    let shared = rows
        .iter()
        .any(|r| r.id != gone.id && r.deployment_id == dep);
    if dep.is_empty() || shared {
        return;
    }
    if let Err(e) = datasets::remove_mounts(&cfg.data_dir, dep) {
        log::warn!("reaper: {e}");
    }
}

/// A container of an app this node started: labelled with `node` and a domain prefix (the
/// listing it comes from filters on `muvee.managed=true` or checks it).
pub fn ours(c: &PsRow, node: &str) -> bool {
    c.node == node && !c.domain_prefix.is_empty()
}

/// The containers among `rows` that nothing owns, by the rules of the module comment.
/// `cleaning`: prefixes whose cleanup never finished.
pub fn unowned<'a>(rows: &'a [PsRow], node: &str, cleaning: &[String]) -> Vec<&'a PsRow> {
    let ours: Vec<&PsRow> = rows.iter().filter(|c| ours(c, node)).collect();
    let mut out = Vec::new();
    for c in &ours {
        let p = c.domain_prefix.as_str();
        let main = format!("muvee-{p}");
        let current = c.name == main;
        let aside = deployer::is_aside_of(c, p);
        if cleaning.iter().any(|x| x == p) {
            if current || aside {
                out.push(*c);
            }
            continue;
        }
        let serving = ours.iter().any(|o| o.name == main && o.running);
        if aside && serving {
            out.push(*c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::fake::Reply;
    use crate::work::ctx::testing::Harness;

    fn row(id: &str, name: &str, prefix: &str, running: bool, node: &str) -> PsRow {
        PsRow {
            id: id.into(),
            name: name.into(),
            running,
            domain_prefix: prefix.into(),
            node: node.into(),
            ..PsRow::default()
        }
    }

    fn names<'a>(v: &[&'a PsRow]) -> Vec<&'a str> {
        v.iter().map(|c| c.name.as_str()).collect()
    }

    #[test]
    fn only_asides_of_a_serving_app_and_unfinished_cleanups_are_unowned() {
        let n = "node-1";
        let rows = vec![
            // app: current runs, so its aside is a leftover.
            row("a1", "muvee-app", "app", true, n),
            row("a2", "muvee-app-old-a2a2a2a2a2a2", "app", true, n),
            // api: current stopped (paused, or crashed): its aside is kept.
            row("b1", "muvee-api", "api", false, n),
            row("b2", "muvee-api-old-b2b2b2b2b2b2", "api", false, n),
            // web: no current container, the aside is what serves.
            row("c2", "muvee-web-old-c2c2c2c2c2c2", "web", true, n),
            // Another node's leftover, and a name we do not know.
            row("d1", "muvee-db", "db", true, "node-2"),
            row("d2", "muvee-db-old-d2d2d2d2d2d2", "db", true, "node-2"),
            row("e1", "muvee-app-debug", "app", true, n),
            // gone: its cleanup never finished.
            row("f1", "muvee-gone", "gone", true, n),
            row("f2", "muvee-gone-old-f2f2f2f2f2f2", "gone", false, n),
            row("f3", "muvee-gone-tool", "gone", true, n),
        ];
        let got = unowned(&rows, n, &["gone".to_string()]);
        assert_eq!(
            names(&got),
            [
                "muvee-app-old-a2a2a2a2a2a2",
                "muvee-gone",
                "muvee-gone-old-f2f2f2f2f2f2"
            ]
        );
        // Without the cleanup mark, the current container of `gone` is owned again (and
        // serves, so its aside is a leftover).
        let got = unowned(&rows, n, &[]);
        assert_eq!(
            names(&got),
            ["muvee-app-old-a2a2a2a2a2a2", "muvee-gone-old-f2f2f2f2f2f2"]
        );
    }

    const MANAGED: &str = "docker ps -a --filter label=muvee.managed=true";

    fn node(name: &str, grace: Duration) -> Harness {
        let mut h = Harness::new(name, &[("NODE_ROLE", "deploy"), ("NODE_NAME", "node-1")]);
        // Below REAP_GRACE's minimum, which is for operators, not for a test's clock.
        h.cfg.reap_grace = grace;
        let rows = "a1\tmuvee-app\trunning\tapp\tdep-1\t8080\tnode-1\n\
                    a2\tmuvee-app-old-a2a2a2a2a2a2\texited\tapp\tdep-0\t8080\tnode-1\n";
        h.fake.on(MANAGED, Reply::Ok(rows.into()));
        h
    }

    #[test]
    fn a_leftover_goes_only_after_the_grace_and_never_during_a_deploy() {
        let h = node("reap-grace", Duration::from_millis(300));
        let mut r = Reaper::default();
        assert!(r.round(&h.cfg, &h.shared).is_empty(), "seen once: kept");
        std::thread::sleep(Duration::from_millis(350));
        // A deploy of the app holds its lock: the leftover waits for the next round.
        let (locks, slots) = (&h.shared.locks, &h.shared.slots);
        let busy = locks
            .with(&deployer::lock_key("app"), slots, || {
                r.round(&h.cfg, &h.shared)
            })
            .unwrap();
        assert!(busy.is_empty());
        assert!(h.fake.ran("docker rm").is_empty());
        let mounts = h.cfg.data_dir.join("mounts");
        std::fs::create_dir_all(mounts.join("dep-0")).unwrap();
        std::fs::create_dir_all(mounts.join("dep-1")).unwrap();
        assert_eq!(r.round(&h.cfg, &h.shared), ["muvee-app-old-a2a2a2a2a2a2"]);
        assert_eq!(h.fake.ran("docker rm"), ["docker rm -f a2"]);
        // Its deployment's mount dir goes with it; the current one's stays.
        assert!(!mounts.join("dep-0").exists() && mounts.join("dep-1").exists());
    }

    #[test]
    fn a_container_owned_again_restarts_the_clock() {
        let h = node("reap-clock", Duration::from_millis(300));
        let mut r = Reaper::default();
        r.round(&h.cfg, &h.shared);
        std::thread::sleep(Duration::from_millis(350));
        // The current container stopped (paused): the aside is owned again, then not.
        let paused = "a1\tmuvee-app\texited\tapp\tdep-1\t8080\tnode-1\n\
                      a2\tmuvee-app-old-a2a2a2a2a2a2\texited\tapp\tdep-0\t8080\tnode-1\n";
        h.fake.once(MANAGED, Reply::Ok(paused.into()));
        assert!(r.round(&h.cfg, &h.shared).is_empty());
        assert!(
            r.round(&h.cfg, &h.shared).is_empty(),
            "the clock started again"
        );
        assert!(h.fake.ran("docker rm").is_empty());
        assert_eq!(interval(Duration::from_secs(600)), Duration::from_secs(300));
        assert_eq!(interval(Duration::from_secs(1)), Duration::from_secs(1));
    }
}
