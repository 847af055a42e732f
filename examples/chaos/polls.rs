//! "Whenever the control plane answers polls, the agent polls and takes new tasks within a
//! poll interval": gaps between an agent's polls, and the wait of each task for its claim,
//! outside the times it could not (the agent down or starting, the poll path of the control
//! plane failing and the backoff after it, its DATA_DIR full, all its task slots taken).

use crate::check::{busy_windows, poll_faults, Record, Violation, GAP_LIMIT_MS, STARTUP_MS};
use crate::hist::Ev;
use crate::plan::Role;

/// At most this many gaps are listed per agent and kind.
const LIST: usize = 10;

pub fn check(rec: &Record) -> (Vec<Violation>, String) {
    let nodes = rec.w.cp.nodes();
    let mut out = Vec::new();
    for role in [Role::Builder, Role::Deploy] {
        let name = rec.w.bed.node_name(role);
        let node = nodes
            .iter()
            .find(|n| n["hostname"] == name.as_str() && n["role"] == role.name())
            .and_then(|n| n["id"].as_str())
            .map(String::from);
        let Some(node) = node else { continue };
        let mut ex = down_windows(rec, role);
        ex.extend(busy_windows(rec, &node));
        let mut polls_ex = ex.clone();
        polls_ex.extend(poll_faults(rec, role, false));
        out.extend(poll_gaps(rec, role, &node, &polls_ex));
        ex.extend(poll_faults(rec, role, true));
        out.extend(claim_waits(rec, role, &node, &ex));
    }
    let polls = rec.w.cp.requests_to("/api/agent/tasks?").len();
    (
        out,
        format!("{polls} polls, {} tasks' claims", rec.tasks.len()),
    )
}

fn poll_gaps(rec: &Record, role: Role, node: &str, ex: &[(u64, u64)]) -> Vec<Violation> {
    let query = format!("node_id={node}");
    let mut polls: Vec<u64> = rec
        .w
        .cp
        .requests_to("/api/agent/tasks?")
        .iter()
        .filter(|r| r.target.contains(&query))
        .map(|r| rec.w.hist.clock.ms_of(r.at))
        .filter(|ms| *ms < rec.end_ms)
        .collect();
    polls.push(rec.end_ms);
    let mut out = Vec::new();
    let mut prev = 0;
    for p in polls {
        if let Some((a, b)) = uncovered(prev, p, ex).filter(|g| g.1 - g.0 > GAP_LIMIT_MS) {
            out.push(Violation {
                invariant: "polls-and-takes",
                task: None,
                ms: a,
                detail: format!(
                    "the {} agent sent no poll for {:.1}s (+{:.1}s … +{:.1}s) while the control \
                     plane answered polls and it had a free task slot",
                    role.name(),
                    (b - a) as f64 / 1000.0,
                    a as f64 / 1000.0,
                    b as f64 / 1000.0
                ),
            });
        }
        prev = p;
    }
    out.truncate(LIST);
    out
}

fn claim_waits(rec: &Record, role: Role, node: &str, ex: &[(u64, u64)]) -> Vec<Violation> {
    let mut out = Vec::new();
    for t in rec.tasks.iter().filter(|t| t["node_id"] == node) {
        let id = t["id"].as_str().unwrap_or("");
        let Some(created) = created_ms(rec, t) else {
            continue;
        };
        let claimed = rec
            .w
            .cp
            .requests_to(&format!("/api/agent/tasks/{id}/"))
            .first()
            .map_or(rec.end_ms, |r| rec.w.hist.clock.ms_of(r.at));
        let Some((a, b)) = uncovered(created, claimed.min(rec.end_ms), ex) else {
            continue;
        };
        if b - a > GAP_LIMIT_MS {
            out.push(Violation {
                invariant: "polls-and-takes",
                task: Some(id.into()),
                ms: a,
                detail: format!(
                    "the {} agent left a {} task pending {:.1}s (+{:.1}s … +{:.1}s) with a free \
                     slot while the control plane answered",
                    role.name(),
                    t["type"].as_str().unwrap_or("?"),
                    (b - a) as f64 / 1000.0,
                    a as f64 / 1000.0,
                    b as f64 / 1000.0
                ),
            });
        }
    }
    out.truncate(LIST);
    out
}

/// When the task was created: our own record, else the control plane's `created_at`.
fn created_ms(rec: &Record, t: &serde_json::Value) -> Option<u64> {
    let id = t["id"].as_str()?;
    let ours = rec.events.iter().find_map(|e| match &e.ev {
        Ev::Task { id: i, .. } if i == id => Some(e.ms),
        _ => None,
    });
    ours.or_else(|| {
        let unix = unix_ms(t["created_at"].as_str()?)?;
        Some(unix.saturating_sub(rec.w.hist.clock.epoch_ms()))
    })
}

/// `2026-12-02T10:11:12.345Z` → ms since 1970.
fn unix_ms(s: &str) -> Option<u64> {
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let frac = s
        .get(20..23)
        .and_then(|f| f.parse::<i64>().ok())
        .unwrap_or(0);
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(((days * 24 + h) * 60 + mi) * 60 * 1000 + sec * 1000 + frac).ok()
}

/// The times the role's agent was not running, or had just started.
fn down_windows(rec: &Record, role: Role) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut down_since = Some(0);
    for e in &rec.events {
        match &e.ev {
            Ev::AgentUp { role: r, .. } if *r == role => {
                out.push((down_since.take().unwrap_or(e.ms), e.ms + STARTUP_MS));
            }
            Ev::AgentDown { role: r, .. } if *r == role => {
                down_since.get_or_insert(e.ms);
            }
            _ => {}
        }
    }
    if let Some(s) = down_since {
        out.push((s, u64::MAX / 2));
    }
    out
}

/// The longest part of `[a, b]` that none of `ex` covers.
fn uncovered(a: u64, b: u64, ex: &[(u64, u64)]) -> Option<(u64, u64)> {
    let mut ex: Vec<(u64, u64)> = ex.iter().copied().filter(|e| e.1 > a && e.0 < b).collect();
    ex.sort_unstable();
    let (mut best, mut at) = (None::<(u64, u64)>, a);
    for (s, e) in ex {
        if s > at && best.map_or(true, |x| s - at > x.1 - x.0) {
            best = Some((at, s));
        }
        at = at.max(e);
    }
    if b > at && best.map_or(true, |x| b - at > x.1 - x.0) {
        best = Some((at, b));
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uncovered_finds_the_longest_free_stretch() {
        assert_eq!(uncovered(0, 100, &[]), Some((0, 100)));
        assert_eq!(uncovered(0, 100, &[(10, 20), (50, 60)]), Some((60, 100)));
        assert_eq!(uncovered(0, 100, &[(0, 70), (60, 100)]), None);
        assert_eq!(uncovered(0, 100, &[(5, 95)]), Some((0, 5)));
    }

    #[test]
    fn rfc3339_milliseconds() {
        assert_eq!(unix_ms("1970-01-01T00:00:01.500Z"), Some(1500));
        assert_eq!(unix_ms("2000-03-01T00:00:00.000Z"), Some(951_868_800_000));
    }
}
